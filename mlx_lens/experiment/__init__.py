"""The experiment: probes, the single-prompt run, collapse metrics, numeric health, fact suites and
their aggregates, chat."""
