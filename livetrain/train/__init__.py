"""Context-frozen training: data formats and tokenization, losses, the frozen-context
forward pass, the context cache, the guarded training step with its speed-ups (fp32
compute, factored gradients, the optimizer seam), and the epoch loop."""

from livetrain.train.context_cache import ContextCache, ContextLookup
from livetrain.train.data import (DataFormatError, Example, PreferenceExample, SFTExample, load_jsonl,
                                  parse_record, tokenize_chat, tokenize_prompt_completion)
from livetrain.train.step import (InvalidExampleError, StepOptions, StepResult, continuation_logprobs,
                                  train_step)

__all__ = ["ContextCache", "ContextLookup", "DataFormatError", "Example", "PreferenceExample", "SFTExample",
           "load_jsonl", "parse_record", "tokenize_chat", "tokenize_prompt_completion", "InvalidExampleError",
           "StepOptions", "StepResult", "continuation_logprobs", "train_step"]
