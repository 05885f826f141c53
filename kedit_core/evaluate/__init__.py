"""Evaluation: CounterFact, zsRE and portability metrics, fluency, perplexity."""

from kedit_core.evaluate.metrics import (baseline_predictions, evaluate_requests, generation_entropy,
                                         generation_metrics, ngram_entropy, starts_with_target)
from kedit_core.evaluate.perplexity import HeldOut, heldout_texts, perplexity
from kedit_core.evaluate.scoring import Scores, score

__all__ = ["HeldOut", "Scores", "baseline_predictions", "evaluate_requests", "generation_entropy",
           "generation_metrics", "heldout_texts", "ngram_entropy", "perplexity", "score",
           "starts_with_target"]
