"""Eval stage: scores that say whether a trained model follows its prompts (chance-corrected, with intervals),
and promotion of a run to champion unless it is worse than the current one at the stated confidence."""
