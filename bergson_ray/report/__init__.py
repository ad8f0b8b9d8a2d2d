"""``bergson-ray report``: an HTML page with PNG figures for finished runs.

Data extraction (``kinds``, ``score_report``, ``validate_report``, ``latency``,
``texts``) is plain reading; ``plots`` draws with matplotlib (an optional dependency:
``pip install 'bergson_ray[report]'``); ``html`` writes the escaped page; ``writer``
(``write_report``) puts it all in a directory atomically. Nothing here needs Ray: a
live service is timed by the caller through a client (``cli/report.py``).
"""
