"""The query service's web page: static files (``index.html``, ``app.js``, ``style.css``)
served by ``actors/http_gateway.py``. No build step, nothing loaded from elsewhere."""
