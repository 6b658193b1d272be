"""SessionPipelineService: the `usage` processor over a fixture transcript, and
GetUsage against the hand-computed figures of tests/fixtures/EXPECTED.md."""

from __future__ import annotations

import shutil
import time
from typing import Dict, Tuple

import grpc
import pytest
from conftest import REPO_ROOT, FleetcareServer

from fleetcare import FleetcareClient
from fleetcare.v1 import session_pipeline_pb2 as pb

# A1 in EXPECTED.md: entries a b c d, spanning midnight UTC.
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "sessions" / "alice" / "0b6e3c1a-5f2d-4a8e-9b71-3c2d1e0f4a51.jsonl"
SONNET = "claude-sonnet-4-20250514"

Figures = Tuple[int, int, int, int, int, int]  # input, output, cache create, cache read, total, messages

EXPECTED_BY_DAY: Dict[str, Figures] = {
    "2026-03-14": (36, 90, 1500, 2200, 3826, 3),  # a b c
    "2026-03-15": (16, 50, 0, 1500, 1566, 1),  # d
}
EXPECTED_BY_MODEL: Dict[str, Figures] = {SONNET: (52, 140, 1500, 3700, 5392, 4)}
EXPECTED_TOTAL: Figures = (52, 140, 1500, 3700, 5392, 4)


def figures(row: pb.UsageRow) -> Figures:
    return (
        row.input_tokens,
        row.output_tokens,
        row.cache_creation_tokens,
        row.cache_read_tokens,
        row.total_tokens,
        row.messages,
    )


def run_usage(client: FleetcareClient) -> pb.RunStats:
    deadline = time.monotonic() + 120
    while True:
        try:
            return client.session_pipeline.RunProcessor(pb.RunProcessorRequest(name="usage"), timeout=120).stats
        except grpc.RpcError as error:
            # ABORTED: a run is already under way; ours follows it.
            if error.code() != grpc.StatusCode.ABORTED or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def usage(client: FleetcareClient, group_by: "pb.UsageGrouping", user: str = "") -> pb.GetUsageResponse:
    return client.session_pipeline.GetUsage(pb.GetUsageRequest(group_by=group_by, user=user))


def test_usage_of_a_fixture_transcript(server: FleetcareServer, client: FleetcareClient) -> None:
    names = [p.name for p in client.session_pipeline.ListProcessors(pb.ListProcessorsRequest()).processors]
    assert "usage" in names

    target = server.session_dir / "alice" / FIXTURE.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(FIXTURE, target)

    stats = run_usage(client)
    assert stats.root_error == ""
    assert stats.scanned == 1
    assert stats.processed == 1
    assert stats.failed == 0 and list(stats.errors) == []
    assert stats.items_extracted == 4  # a b c d; the repeats of `a` merge, the truncated line is skipped

    by_day = usage(client, pb.USAGE_GROUPING_DAY)
    assert {row.key: figures(row) for row in by_day.rows} == EXPECTED_BY_DAY
    assert [row.key for row in by_day.rows] == sorted(EXPECTED_BY_DAY)
    assert figures(by_day.totals) == EXPECTED_TOTAL

    by_model = usage(client, pb.USAGE_GROUPING_MODEL)
    assert {row.key: figures(row) for row in by_model.rows} == EXPECTED_BY_MODEL
    assert figures(by_model.totals) == EXPECTED_TOTAL

    by_session = usage(client, pb.USAGE_GROUPING_SESSION, user="alice")
    assert [(row.key, figures(row)) for row in by_session.rows] == [
        ("alice/0b6e3c1a-5f2d-4a8e-9b71-3c2d1e0f4a51", EXPECTED_TOTAL)
    ]
    assert list(by_session.rows[0].models) == [SONNET]

    assert usage(client, pb.USAGE_GROUPING_USER, user="bob").rows == []

    # Running again never double counts.
    again = run_usage(client)
    assert again.failed == 0
    assert figures(usage(client, pb.USAGE_GROUPING_DAY).totals) == EXPECTED_TOTAL


def test_unknown_grouping_is_invalid(client: FleetcareClient) -> None:
    with pytest.raises(grpc.RpcError) as error:
        usage(client, pb.USAGE_GROUPING_UNSPECIFIED)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
