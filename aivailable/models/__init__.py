"""Model sources in one place: what a source string names (sources.py, the one list of
schemes), whether a deploy of it can work at all (check.py), the store that turns it into a
verified local GGUF (store.py), downloads from Hugging Face and the web (hub.py) and copies
between peers (transfer.py).

A floor of the app (docs/DESIGN's "The app's floors"): it imports only `aivailable.gpu`,
`aivailable.metrics`, the lower packages (`placement`, `peer`, `consensus`), the standard
library and third-party packages, never `cluster/`, `api/`, `access/`, `backends/`,
`server.py` or `config.py`. Its errors are its own (`ModelSourceError` and kin); callers turn
them into HTTP answers.
"""
