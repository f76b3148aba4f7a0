"""An in-memory Flower ``Grid`` for the server's round loop, without Ray or a SuperLink.

Every pushed instruction is answered at once by ``answer(vehicle_index, global_arrays)``, which returns
the vehicle's reply as numpy arrays plus its ``num-examples`` (or None: the vehicle drops out, an error
reply); vehicles in ``silent`` never answer (a straggler past any deadline). Replies
carry what a real ClientApp sends (``client.py``: arrays, metrics, meta), so ``run_rounds`` and the real
Flower strategies see the same Messages as in a simulation; the tests then know every update exactly.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from typing import Any, Self

import numpy as np

from driveloop.federated.client import ARRAYS_KEY, META_KEY, METRICS_KEY, vehicle_id_for

Arrays = dict[str, np.ndarray]
Answer = Callable[[int, Arrays], "tuple[Arrays, float] | None"]


def reply_content(vehicle_id: str, arrays: Arrays, num_examples: float) -> Any:
    """The RecordDict a vehicle replies with (client.py's three records)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    return RecordDict({
        ARRAYS_KEY: ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
        METRICS_KEY: MetricRecord({"num-examples": num_examples, "train-time-s": 0.0}),
        META_KEY: ConfigRecord({"vehicle-id": vehicle_id}),
    })


class FakeGrid:
    """Node ids 1…n are vehicles fl000…; ``pushed`` counts instructions (one per sampled vehicle and round).

    Use it as a context manager: inside, Flower's ``TaskIdentity`` names a server task (what the ServerApp
    runtime sets before ``main``), so strategies can build their instructions."""

    def __init__(self, vehicles: int, answer: Answer, silent: frozenset[int] = frozenset()) -> None:
        self.answer = answer
        self.silent = silent
        self.nodes = {i + 1: i for i in range(vehicles)}
        self.pushed = 0
        self._replies: dict[str, Any] = {}

    def __enter__(self) -> Self:
        from flwr.supercore.task_identity import TaskIdentity

        self._saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        return self

    def __exit__(self, *exc: object) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = self._saved

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Any]) -> list[str]:
        from flwr.app import Error, Message

        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = mid = str(uuid.uuid4())  # what the SuperLink does
            index = self.nodes[msg.metadata.dst_node_id]
            self.pushed += 1
            ids.append(mid)
            if index in self.silent:
                continue
            arrays = {k: np.asarray(a.numpy()) for k, a in msg.content[ARRAYS_KEY].items()}
            out = self.answer(index, arrays)
            if out is None:
                self._replies[mid] = Message(Error(code=0, reason="dropped out"), reply_to=msg)
            else:
                self._replies[mid] = Message(reply_content(vehicle_id_for(index), *out), reply_to=msg)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Any]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]
