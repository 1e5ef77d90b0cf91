"""`vlmtag serve`: the web app to look at, search and curate a library (extra: serve)."""
