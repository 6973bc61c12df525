"""The README's SQL examples run, on either layout, and answer what they say."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from tests.factories import make_event
from tests.processes import ROOT


def _readme_queries() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Querying the data", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sql\n(.*?)```", section, flags=re.DOTALL)


@pytest.fixture
def stored(db):  # type: ignore[no-untyped-def]
    """Two subreddits: recent posts and comments (one removed), an old post, a processed row."""
    from sentiment.processing import mark_processed
    from sentiment.sinks.postgres import insert_batch

    now = datetime.now(UTC)
    recent = now - timedelta(minutes=50)
    old = now - timedelta(days=2)
    wsb = [
        make_event(occurred_at=recent + timedelta(seconds=1), title="GME to the moon"),
        make_event(occurred_at=recent + timedelta(seconds=2), title="Puts on SPY"),
        make_event(occurred_at=recent + timedelta(seconds=3), event_type="comment", body="bullish"),
        make_event(occurred_at=recent + timedelta(seconds=4), event_type="comment", body="bearish"),
        make_event(
            occurred_at=recent + timedelta(seconds=5), event_type="comment", body="[removed]"
        ),
        make_event(occurred_at=old, title="last week's thread"),
    ]
    stocks = make_event(subreddit="stocks", occurred_at=recent, event_type="comment", body="meh")
    insert_batch([*wsb, stocks])
    mark_processed([(stocks.id, stocks.occurred_at)])
    return {"wsb": wsb, "old": old}


def test_the_readme_has_the_three_queries():
    assert len(_readme_queries()) == 3


def test_activity_per_subreddit_and_hour(db, stored):
    per_hour = _readme_queries()[0]
    with db.connect() as conn:
        rows = conn.execute(text(per_hour)).all()

    totals: dict[str, list[int]] = {}
    for hour, subreddit, submissions, comments in rows:
        assert hour.minute == hour.second == 0
        total = totals.setdefault(subreddit, [0, 0])
        total[0] += submissions
        total[1] += comments
    assert totals == {"wallstreetbets": [2, 3], "stocks": [0, 1]}  # the 2-day-old post is out


def test_a_subreddits_last_day_as_text(db, stored):
    as_text = _readme_queries()[1]
    with db.connect() as conn:
        rows = conn.execute(text(as_text)).mappings().all()

    assert [row["id"] for row in rows] == [event.id for event in stored["wsb"][:4]]
    assert rows[0]["text"].startswith("GME to the moon\nto the moon")
    assert [row["text"] for row in rows[2:]] == ["bullish", "bearish"]
    assert rows[0]["author"] == stored["wsb"][0].payload["author"]


def test_the_backlog_per_subreddit(db, stored):
    backlog = _readme_queries()[2]
    with db.connect() as conn:
        rows = conn.execute(text(backlog)).all()

    assert [(subreddit, count) for subreddit, count, _ in rows] == [("wallstreetbets", 6)]
    assert rows[0][2] == stored["old"]  # processed rows are not in it; the oldest is
