import pytest

from nosa_sglang.cli import build_parser, main
from nosa_sglang.demo import DemoOptions, run_demo


def test_demo_prints_a_locality_table_and_text(tmp_path):
    lines = []
    tokens = run_demo(
        DemoOptions(checkpoint=tmp_path / "ckpt", prompt_tokens=4200, steps=6, report_every=2), print_fn=lines.append
    )
    assert len(tokens) == 6
    assert "sparse" in lines[0] and "66 blocks" in lines[0]
    rows = [l.split() for l in lines if l.strip() and l.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == [2, 4, 5]
    for r in rows:
        assert float(r[2]) == 64.0  # blocks selected per head: the whole budget
        assert int(r[4]) <= int(r[5])  # max entering within the bound
    assert lines[-1].startswith("[demo] generated 6 tokens")
    # the checkpoint is reused on the next run
    again = run_demo(DemoOptions(checkpoint=tmp_path / "ckpt", prompt_tokens=4200, steps=6, report_every=2), print_fn=lambda s: None)
    assert again == tokens


@pytest.mark.parametrize("argv", [["demo", "--steps", "0"], ["demo", "--prompt-tokens", "x"], ["nope"]])
def test_cli_rejects_bad_flags_with_usage_exit(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_cli_help_lists_demo():
    assert "demo" in build_parser().format_help()
