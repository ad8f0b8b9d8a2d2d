"""In-process attribution over a gradient store, for users without a cluster.

``Attributor`` is the no-Ray twin of the query service: the same FAISS shards (saved next
to the store and shared with ``bergson-ray serve``), the same query gradients, the same
transforms, the same result objects. Tests compare the two answer for answer.

    attr = Attributor("runs/idx", unit_norm=True)
    attr.query(["def foo(): ..."], k=10)[0].texts
    with attr.trace(model, k=5) as hits:
        model(x, labels=x).loss.backward()
    hits.indices, hits.scores
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import FaissConfig
from ..errors import StoreError
from .documents import DocumentLookup
from .faiss_index import Hits
from .gradient_index import GradientIndex
from .query_grads import QueryGradientMaker, normalize_queries
from .results import QueryResult, to_results
from .rows import StoreRows
from .store_spec import open_store_spec

log = logging.getLogger(__name__)


@dataclass
class TraceResult:
    """Filled in when the ``trace`` block exits: ``[N, k]`` scores and row ids."""

    scores: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    results: list[QueryResult] = field(default_factory=list)


class Attributor:
    """Search a gradient store in this process (FAISS, ``Flat`` = exact by default).

    ``faiss_cfg`` or keyword overrides of :class:`FaissConfig` (``index_factory``,
    ``unit_norm``, ``hessian_path``, ``nprobe``, ``num_shards``...) choose the index.
    The model is loaded on the first text query, never for gradient-only use.
    """

    def __init__(
        self,
        store: str | Path,
        faiss_cfg: FaissConfig | None = None,
        *,
        model: str = "",
        device: str = "cpu",
        text_field: str = "text",
        **faiss_overrides: Any,
    ):
        cfg = faiss_cfg or FaissConfig()
        if faiss_overrides:
            cfg = dataclasses.replace(cfg, **faiss_overrides)
        self.cfg = cfg
        self.spec = open_store_spec(store)
        self.index = GradientIndex(
            StoreRows(self.spec.store), cfg, store_path=self.spec.path, built=self.spec.preprocess
        )
        self.docs = DocumentLookup(self.spec, text_field)
        self.model_name = model
        self.device = device
        self._maker: QueryGradientMaker | None = None

    # -- gradients in ---------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return self.index.num_rows

    @property
    def dim(self) -> int:
        return self.index.dim

    def search_hits(
        self, grads: np.ndarray | torch.Tensor, k: int, *, reverse: bool = False
    ) -> Hits:
        if isinstance(grads, torch.Tensor):
            grads = grads.detach().float().cpu().numpy()
        return self.index.search(grads, k, reverse=reverse)

    def query_gradients(
        self, grads: np.ndarray | torch.Tensor, k: int = 10, *, reverse: bool = False
    ) -> list[QueryResult]:
        """Top-k (bottom-k) store rows for raw query gradients ``[Q, dim]``."""
        hits = self.search_hits(grads, k, reverse=reverse)
        return self._results(hits, None, reverse)

    search = query_gradients

    # -- texts in -----------------------------------------------------------------
    @property
    def maker(self) -> QueryGradientMaker:
        if self._maker is None:
            self._maker = QueryGradientMaker(self.spec, model=self.model_name, device=self.device)
        return self._maker

    def gradients(self, queries: Any) -> np.ndarray:
        """Raw query gradient rows for texts or (prompt, completion) pairs."""
        return self.maker.compute(queries)

    def query(self, queries: Any, k: int = 10, *, reverse: bool = False) -> list[QueryResult]:
        """Top-k (bottom-k) store rows, with their documents' text, for each query."""
        queries = normalize_queries(queries)
        hits = self.search_hits(self.gradients(queries), k, reverse=reverse)
        return self._results(hits, queries, reverse)

    def _results(self, hits: Hits, queries: list | None, reverse: bool) -> list[QueryResult]:
        flat = hits.ids.reshape(-1)
        return to_results(
            hits,
            texts=self.docs.texts(flat),
            doc_ids=self.docs.doc_ids(flat),
            queries=queries,
            reverse=reverse,
        )

    # -- your own forward/backward -------------------------------------------------
    @contextmanager
    def trace(
        self, model: torch.nn.Module, k: int = 10, *, reverse: bool = False
    ) -> Iterator[TraceResult]:
        """Collect per-example gradients of ``model`` during the block, then search.

        Run a forward pass and ``backward()`` of a per-example-summed loss inside the
        block (``model(x, labels=x).loss.backward()``). ``model`` must be the store's
        model (same target modules). Every position of every sequence is collected, so
        pad inputs yourself only if the padded positions carry no loss.
        """
        from ..gradients.collector import PerExampleCollector
        from ..gradients.hooks import ModuleTaps
        from ..gradients.modules import find_target_modules

        if self.spec.build is None:
            raise StoreError(
                f"{self.spec.path} has no build config.yaml; trace cannot match its rows"
            )
        grad_cfg = dataclasses.replace(self.spec.build.grad, attribute_tokens=False)
        modules = find_target_modules(model, grad_cfg)
        normalizers = None
        if grad_cfg.optimizer_state:
            from ..gradients.normalizers import load_optimizer_normalizers

            normalizers = load_optimizer_normalizers(
                grad_cfg.optimizer_state, model, modules, grad_cfg.include_bias
            )
        collector = PerExampleCollector(modules, grad_cfg, normalizers)
        if dict(collector.grad_sizes) != self.spec.grad_sizes:
            raise StoreError(
                f"this model's gradient layout ({len(collector.grad_sizes)} modules, dim "
                f"{sum(collector.grad_sizes.values())}) differs from the store's "
                f"({len(self.spec.grad_sizes)} modules, dim {self.spec.dim})"
            )
        collector.begin(None)  # type: ignore[arg-type]
        result = TraceResult()
        with ModuleTaps(modules, _AllPositions(collector)):
            yield result
        blocks = collector.finish()
        rows = torch.cat([blocks[m] for m in collector.grad_sizes], dim=1).float()
        hits = self.search_hits(rows, k, reverse=reverse)
        result.scores = torch.from_numpy(hits.scores)
        result.indices = torch.from_numpy(hits.ids)
        result.results = self._results(hits, None, reverse)


class _AllPositions:
    """Tap consumer that collects every position (the mask is made from the first grad)."""

    def __init__(self, collector):
        self.collector = collector

    def on_forward(self, name, module, a) -> None:
        self.collector.on_forward(name, module, a)

    def on_backward(self, name, module, g) -> None:
        mask = self.collector.mask
        if mask is None or tuple(mask.shape) != tuple(g.shape[:2]):
            self.collector.mask = torch.ones(g.shape[:2], dtype=torch.bool, device=g.device)
        self.collector.on_backward(name, module, g)
