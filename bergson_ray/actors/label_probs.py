"""A :class:`~bergson_ray.actors.batch_worker.BatchWorker` output for TRAK's ``1 - p_i``.

``trak`` weights every training row by one minus its mean label-token probability
under the model. That needs only a forward pass, on exactly the tokens the gradient
store was built from, so it runs on the same worker pool and runner (same reading,
tokenization and truncation) with this output in place of ``Rows``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .batch_worker import Rows


@dataclass
class LabelProbs(Rows):
    """Per document: ``prob``, the mean probability of its label tokens."""

    max_docs: int | None = None
    """Documents per forward pass at most (bergson's ``--loss_batch_size``); the token
    budget still applies."""

    def compute(self, runner, idx: np.ndarray) -> dict[str, np.ndarray]:
        from ..data.batching import collate, pack_by_token_budget
        from ..gradients.head_loss import chunked_label_log_probs, head_split, last_hidden
        from ..gradients.losses import (
            mean_label_probability,
            mean_of_label_probabilities,
            next_token_targets,
        )

        idx = np.asarray(idx, dtype=np.int64)
        docs = runner.tokenize(idx)
        prob = np.zeros(len(idx), dtype=np.float64)
        keep = [j for j, d in enumerate(docs) if len(d.input_ids) >= 2]
        caps = [c for c in (runner.spec.batch.max_batch_size, self.max_docs) if c]
        plan = pack_by_token_budget(
            [len(docs[j].input_ids) for j in keep],
            runner.spec.batch.token_batch_size,
            min(caps) if caps else None,
        )
        model = runner.engine.model
        device = runner.engine.device
        split = head_split(model)  # no whole logits where the model allows it
        with torch.no_grad():
            for batch in plan:
                positions = [keep[k] for k in batch]
                packed = collate([docs[j] for j in positions])
                ids, labels = packed.input_ids.to(device), packed.labels.to(device)
                if split is None:
                    p, _ = mean_label_probability(model(ids).logits, labels)
                else:
                    body, head = split
                    log_p = chunked_label_log_probs(
                        last_hidden(body, ids), head, next_token_targets(labels)
                    )
                    p, _ = mean_of_label_probabilities(log_p[:, :-1], labels)
                prob[positions] = p.double().cpu().numpy()
        lengths = np.array([len(d.input_ids) for d in docs], dtype=np.int64)
        return {"idx": idx, "prob": prob, "length": lengths}
