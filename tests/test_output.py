"""The one output sink: data on stdout, whole values off a terminal, escaped text, metavars."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console

from tvtool.cli import output
from tvtool.errors import printable
from tvtool.store.store import Store
from tvtool.vectors.stored import save_tensor_object

EVIL = "blk.\x1b]0;owned\x07[red]x[/red]\x9b2J"


def _vector(tensors: dict[str, torch.Tensor], name: str) -> str:
    store = Store()
    digest = save_tensor_object(store, "vector", tensors).digest
    store.set_ref(name, digest)
    return digest


def test_printable_and_plain_escape_controls_and_markup() -> None:
    assert printable("a\x1b[31mb\x07\x9bc\td\ne", output.LINES) == "a\\x1b[31mb\\x07\\x9bc\td\ne"
    assert output.plain("[red]x[/red]\x1b") == "\\[red]x\\[/red]\\x1b"


def test_table_off_a_terminal_is_whole_tab_separated_rows() -> None:
    buf = io.StringIO()
    con = Console(file=buf, force_terminal=False)
    digest = "ab" * 32
    output.table([output.Col("name"), output.Col("digest", digest=True)],
                 [["a\tb", digest], [EVIL, None]], title="t", console=con)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "name\tdigest"  # no title line on a data console
    assert lines[1] == f"a b\t{digest}"
    assert lines[2].split("\t")[0] == printable(EVIL, output.LINES) and "\x1b" not in buf.getvalue()


def test_table_in_a_terminal_wraps_and_keeps_names_literal() -> None:
    def render(columns, rows, width=24) -> str:
        buf = io.StringIO()
        output.table(columns, rows, console=Console(file=buf, force_terminal=True, width=width,
                                                    color_system=None))
        return buf.getvalue()

    long = "visual.transformer.resblocks.11.attn.in_proj_weight"
    text = render(["block"], [[long]])
    cells = "".join(ln.strip("│┃ \n") for ln in text.splitlines()[3:-1])
    assert cells == long  # wrapped over lines, nothing cut
    text = render([output.Col("digest", digest=True), "name"], [["cd" * 32, EVIL]], 80)
    assert "cd" * 6 in text and "cd" * 7 not in text  # digests shortened to 12 in a terminal
    assert "[red]" in text and "\x1b]0;" not in text and "\x07" not in text


def test_inspect_keeps_markup_literal_and_sorts_top_by_l2(invoke) -> None:
    g = torch.Generator().manual_seed(0)
    markup = "blk.[red]x[/red][link=http://e]y[/link]"
    tensors = {
        "big.small_norm": 1e-3 * torch.randn(64, 64, generator=g),
        "tiny.large_norm": 10 * torch.randn(4, generator=g),
        markup: torch.randn(8, generator=g),
    }
    _vector(tensors, "evil")
    r = invoke("inspect", "evil", "--top", "2")
    assert r.exit_code == 0, r.output
    rows = [ln.split("\t")[0] for ln in r.stderr.splitlines() if "\t" in ln][1:]
    l2 = {k: float(v.norm()) for k, v in tensors.items()}
    assert rows == sorted(l2, key=lambda k: -l2[k])[:2]
    r = invoke("inspect", "evil", "--top", "0")
    assert markup in r.stderr
    doc = json.loads(invoke("inspect", "evil", "--json").stdout)
    assert {b["name"] for b in doc["vectors"][0]["blocks"]} == set(tensors)


def test_control_characters_in_tensor_names_are_refused_and_escaped(invoke) -> None:
    _vector({EVIL: torch.zeros(2)}, "evil")
    r = invoke("inspect", "evil")
    assert r.exit_code == 1 and r.stderr.startswith("Error: ")
    assert "\x1b" not in r.stderr and "\x07" not in r.stderr and "\x9b" not in r.stderr
    assert printable(EVIL, output.LINES) in r.stderr


def test_error_messages_escape_controls(invoke) -> None:
    r = invoke("inspect", "no\x1b]0;x\x07pe")
    assert r.exit_code == 1 and "\x1b" not in r.stderr and "\\x1b" in r.stderr


@pytest.mark.parametrize(
    "command",
    [["compose"], ["select"], ["eval"], ["inspect"], ["merge"], ["extract"], ["store", "ls"],
     ["store", "gc"], ["demo"]],
)
def test_help_shows_real_metavars(invoke, command) -> None:
    r = invoke(*command, "--help")
    assert r.exit_code == 0
    for bad in ("<bool>", "<list[", "<str>", "<Path", "<int", "<float>"):
        assert bad not in r.stdout, (command, bad)


def test_metavars_name_what_the_value_is(invoke) -> None:
    text = " ".join(invoke("compose", "--help").stdout.split())
    assert "--data -d PATH" in text and "--model-config FILE" in text
    assert "--shots -k INT" in text and "--threshold FLOAT" in text
    assert "--json Print" in text  # a flag takes no value


def test_emit_routes_json_quiet_and_human(capsys) -> None:
    seen = []
    output.emit({"a": 1}, json_out=True, human=seen.append, data=["d"])
    assert json.loads(capsys.readouterr().out) == {"a": 1} and not seen
    output.emit({"a": 1}, quiet=True, human=seen.append, data=["d"], quiet_data=["q"])
    assert capsys.readouterr().out == "q\n" and not seen
    output.emit({"a": 1}, human=seen.append, data=["d"])
    assert capsys.readouterr().out == "d\n" and seen == [{"a": 1}]
