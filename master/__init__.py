"""hypersearch master: samples trials, dispatches them, watches, reports."""
