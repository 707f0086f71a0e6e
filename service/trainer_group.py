"""One trainer per consumer group, checked at start.

A trainer keeps one checkpoint for every task it learns (and, for the strategies that share one
learner, one learner for all of them). Two trainers in one group would split the partitions and both
write that checkpoint, each undoing the other's offsets. Until checkpoints are per task, a second
trainer refuses to start: ``ensure_sole_trainer`` looks at the group's members through Kafka's admin
API before the trainer joins. A member under the trainer's own static id (``kafka_group_instance_id``)
is its own previous life, restarted; any other member is waited for up to the session timeout (a
trainer killed with ``kill -9`` stays a member until then), and if it is still there the new trainer
stops with a settings error that says which member holds the group.
"""

from __future__ import annotations

import time
from typing import Any

from kafka import KafkaAdminClient
from kafka.errors import KafkaError

from service.kafka_access import client_options
from service.settings import Settings, SettingsError

#: Added to the session timeout: the coordinator's own check of a silent member is periodic.
MARGIN_S = 5.0
#: How long a coordinator that does not answer is asked again before the check gives up on it.
UNANSWERED_S = 10.0


def other_members(settings: Settings, admin: Any) -> list[dict[str, Any]]:
    """The group's members other than this trainer's static identity."""
    group = admin.describe_groups([settings.kafka_group_id]).get(settings.kafka_group_id, {})
    ours = settings.kafka_group_instance_id
    return [m for m in group.get("members", []) if ours is None or m.get("group_instance_id") != ours]


def ensure_sole_trainer(settings: Settings, wait_s: float | None = None) -> None:
    """Return once no other trainer is a member of ``kafka_group_id``; SettingsError naming the
    setting if one still is after ``wait_s`` (default: the session timeout and a margin)."""
    started = time.monotonic()
    deadline = started + (settings.kafka_session_timeout_s + MARGIN_S if wait_s is None else wait_s)
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=settings.kafka_bootstrap,
            client_id="continual-trainer-check",
            **client_options(settings),
        )
    except KafkaError:
        return  # brokers away: the trainer waits for them as always, and the group protects the rest
    try:
        while True:
            try:
                others = other_members(settings, admin)
            except KafkaError:  # no coordinator yet (a new cluster) or one moving: ask again, briefly
                if time.monotonic() >= min(deadline, started + UNANSWERED_S):
                    return  # it cannot say: let the trainer join, as without this check
                time.sleep(1.0)
                continue
            if not others:
                return
            if time.monotonic() >= deadline:
                holder = others[0]
                who = holder.get("group_instance_id") or holder.get("member_id")
                raise SettingsError(
                    f"kafka_group_id: group {settings.kafka_group_id!r} already has a trainer ({who} "
                    f"from {holder.get('client_host', '?')}); one trainer per group: stop it, or give "
                    "this one another kafka_group_id (and registry) to learn another stream"
                )
            time.sleep(1.0)
    finally:
        admin.close()
