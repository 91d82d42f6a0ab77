"""GvU: post-train a unified multimodal model so that its generation agrees with its own understanding."""

__version__ = "0.1.0"
