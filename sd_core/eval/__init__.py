"""Eval stage: scores that say whether a trained model follows its prompts, and promotion of a run to
champion only when it is no worse than the current one."""
