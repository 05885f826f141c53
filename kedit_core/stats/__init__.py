"""Second-moment statistics: collection, exact merging, the content-addressed store, and
AlphaEdit's null-space projectors."""

from kedit_core.stats.corpus import Corpus, open_corpus
from kedit_core.batching import batches_by_tokens
from kedit_core.stats.moments import (SHARD_TEXTS, SecondMoment, collect_second_moments, collect_sharded, merge_all,
                                      tokenize_corpus)
from kedit_core.stats.store import StatsSpec, StatsStore, StatsView

__all__ = ["Corpus", "SecondMoment", "StatsSpec", "StatsStore", "StatsView", "batches_by_tokens",
           "SHARD_TEXTS", "collect_second_moments", "collect_sharded", "merge_all", "open_corpus", "tokenize_corpus"]
