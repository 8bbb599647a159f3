"""Is the new code slower: comparison statistics, accepted regressions, ratio baselines, A/B runs."""
