"""The toy world: everything GvU needs to run and be measured on two CPU cores, and nothing the trainer needs.

    world.py      the shapes world: scenes, the exact renderer and reader, GenEval-style prompts and evaluator
    backend.py    ToyUMM, the toy early-fusion UMM behind the backend contract (gvu.models.base)
    evaluator.py  held-out generation scores and understanding checks with the world's exact evaluator
    pretrain.py   pretraining of the shipped base (gvu/assets/toy_umm): python -m gvu.toy.pretrain

The general trainer (gvu/train.py and the modules it imports) sees the toy only through the backend registry
(`model.backend: toy`) and the evaluator chosen by the prompt source (`data.prompts: shapes`).
"""
