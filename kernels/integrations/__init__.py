"""Drop-ins that make other trainers use GvU's kernels (`kernels.integrations.trl.patch_trl_grpo`)."""
