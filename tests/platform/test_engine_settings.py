"""The engine's settings from the environment, and the inline engine's contract (every shard once, in order)."""

from __future__ import annotations

import pytest

from ca_platform.engine import EngineSettings, InlineEngine, open_engine


def test_settings_come_from_the_environment_and_explicit_values_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CA_ENGINE", "ray")
    monkeypatch.delenv("CA_RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    monkeypatch.setenv("CA_RAY_GPUS_PER_SCORER", "0.5")
    monkeypatch.setenv("CA_RAY_SCORER_ACTORS", "4")
    settings = EngineSettings.from_env()
    assert (settings.kind, settings.address, settings.gpus_per_scorer, settings.scorer_actors) == (
        "ray",
        "10.0.0.5:6379",
        0.5,
        4,
    )
    monkeypatch.setenv("CA_RAY_ADDRESS", "ray://head:10001")  # ours before Ray's own variable
    assert EngineSettings.from_env().address == "ray://head:10001"
    assert EngineSettings.from_env(kind="inline", address=None).kind == "inline"


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [("CA_ENGINE", "spark", "expected 'ray' or 'inline'"), ("CA_RAY_MAX_RETRIES", "many", "is not a number")],
)
def test_bad_settings_are_refused_by_name(monkeypatch: pytest.MonkeyPatch, name: str, value: str, says: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=says):
        EngineSettings.from_env()


def test_the_inline_engine_runs_every_shard_once_in_order() -> None:
    engine = open_engine(EngineSettings(kind="inline"))
    assert isinstance(engine, InlineEngine)
    assert list(engine.map_shards(str.upper, ["a", "b", "c"], "scorer")) == [("a", "A"), ("b", "B"), ("c", "C")]
