"""Pictures of a run and the HTML report, drawn from its artifacts."""
