"""Evaluation: CounterFact, zsRE and portability metrics, fluency, perplexity."""

from kedit_core.evaluate.metrics import (baseline_predictions, evaluate_requests, generation_entropy,
                                         ngram_entropy)
from kedit_core.evaluate.perplexity import heldout_texts, perplexity
from kedit_core.evaluate.scoring import Scores, score

__all__ = ["Scores", "baseline_predictions", "evaluate_requests", "generation_entropy",
           "heldout_texts", "ngram_entropy", "perplexity", "score"]
