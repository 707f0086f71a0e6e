"""Reading ahead while a round trains, so that a new task never waits behind another task's round.

An idle trainer serves a new task's first version (label prototypes) seconds after its first
``first_version_records`` training records. While a long round trains, the trainer polls nothing, so
a new task would wait for the whole round. Between the round's steps, the trainer instead reads ahead
on the topic (``Ingest.peek``: nothing handed over, dead-lettered or moved); a task it has never seen
that has enough training records there is published and served at once, built exactly as an idle
trainer builds it. After the round the consumer is rewound, and the records are read again, absorbed,
trained and checkpointed like any others: the durability order (versions and offsets durable before
the commit) is untouched, and a crash loses nothing (the next trainer publishes the task again).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Container

from service.ingest import Ingest
from service.publishing import Publisher
from service.records import Record
from service.settings import Settings

log = logging.getLogger(__name__)

#: How often a round reads ahead (each read is one poll without waiting).
LOOK_EVERY_S = 0.5


class LookAhead:
    """Holds the training records of unknown tasks read ahead during one round (at most
    ``round_max_records`` records read in all), and the first versions served from them."""

    def __init__(self, settings: Settings, publisher: Publisher) -> None:
        self.settings = settings
        self.publisher = publisher
        self._held: dict[str, list[Record]] = {}
        self._read = 0
        self._next_look = 0.0
        #: Tasks served this way and their first version, until the trainer takes the task in.
        self.served: dict[str, int] = {}

    def look(self, ingest: Ingest, known: Container[str], partition: int | None = None) -> None:
        """Read ahead (at most every LOOK_EVERY_S) and serve every unknown task with enough records
        (of ``partition`` only, when the trainer learns one); between reads, only keep the group
        membership alive."""
        now = time.monotonic()
        if now < self._next_look or self._read >= self.settings.round_max_records:
            ingest.keepalive()
            return
        self._next_look = now + LOOK_EVERY_S
        for record in ingest.peek(timeout_s=0, partitions=None if partition is None else {partition}):
            self._read += 1
            if record.split == "train" and record.task not in known and record.task not in self.served:
                self._held.setdefault(record.task, []).append(record)
        for task, held in list(self._held.items()):
            if len(held) >= self.settings.first_version_records:
                del self._held[task]
                self.served[task] = self.publisher.publish_first_from(task, held)
                log.info("task %r served (v%d) from records read ahead of a round", task, self.served[task])

    def rewind(self, ingest: Ingest) -> None:
        """The round is over: forget what was read ahead and put the consumer back before it."""
        ingest.rewind()
        self._held, self._read, self._next_look = {}, 0, 0.0
