import pytest


@pytest.mark.slow
def test_hostile_pass_all_cases_refused_with_one_line_and_nothing_lost(tmp_path):
    """The whole hostile pass (tests/hostile_pass.py, ~230 cases, about a minute): every case exits 2 with one line
    and the protected run, bundle and checkpoint are byte-for-byte unchanged."""
    from tests.hostile_pass import main

    assert main(["--out", str(tmp_path / "hostile.json")]) == 0
