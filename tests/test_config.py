"""Configs: YAML + --key overrides, one-line errors for unknown keys and wrong types."""
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from models.config import ConfigError, parse_config


@dataclass
class DemoConfig:
    model_name: str = field(default="Latte-XL/2", metadata={"choices": ("Latte-XL/2", "Latte-S/2")})
    num_frames: int = 16
    learning_rate: float = 1e-4
    use_recompute: bool = False
    class_labels: list[int] = field(default_factory=list)
    checkpoint: str | None = None


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_values_and_command_line_overrides(tmp_path):
    path = write(tmp_path, "model_name: Latte-S/2\nnum_frames: 8\nlearning_rate: 2.0e-5\n")
    cfg = parse_config(DemoConfig, ["-c", path, "--num_frames", "4", "--use_recompute", "True",
                                    "--class_labels", "1,3"], prog="t")
    assert (cfg.model_name, cfg.num_frames, cfg.learning_rate) == ("Latte-S/2", 4, 2e-5)
    assert cfg.use_recompute is True and cfg.class_labels == [1, 3] and cfg.checkpoint is None


def test_defaults_without_a_file():
    assert parse_config(DemoConfig, [], prog="t") == DemoConfig()


@pytest.mark.parametrize("text, needle", [
    ("num_frame: 8\n", "unknown key 'num_frame'"),
    ("num_frames: eight\n", "'num_frames' in"),
    ("model_name: Latte-Q/2\n", "choose one of: Latte-XL/2, Latte-S/2"),
    ("use_recompute: maybe\n", "must be bool"),
    ("- a list\n", "must hold a mapping"),
    ("a: [unclosed\n", "not valid YAML"),
])
def test_bad_yaml_is_a_one_line_error_naming_the_key(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        parse_config(DemoConfig, ["-c", path], prog="t")
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_unknown_key_suggests_the_close_one_and_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"did you mean 'num_frames'.*valid keys: model_name, num_frames"):
        parse_config(DemoConfig, ["--num_framez", "3"], prog="t")


def test_wrong_type_on_the_command_line_names_the_source():
    with pytest.raises(ConfigError, match="'learning_rate' on the command line must be float"):
        parse_config(DemoConfig, ["--learning_rate", "fast"], prog="t")


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        parse_config(DemoConfig, ["-c", str(tmp_path / "nope.yaml")], prog="t")


def test_latte_command_lists_subcommands_and_rejects_unknown_ones():
    run = lambda *a: subprocess.run([sys.executable, "-m", "latte_cli", *a], capture_output=True, text=True)
    out = run("--help")
    assert out.returncode == 0 and "convert" in out.stdout
    bad = run("frobnicate")
    assert bad.returncode == 2 and "unknown command 'frobnicate'" in bad.stderr


def test_every_subcommand_has_help():
    script = ("import contextlib, io, latte_cli\n"
              "for name in latte_cli.SUBCOMMANDS:\n"
              "    out = io.StringIO()\n"
              "    with contextlib.redirect_stdout(out):\n"
              "        try:\n"
              "            latte_cli.main([name, '--help'])\n"
              "        except SystemExit as stop:\n"
              "            assert stop.code in (0, None), (name, stop.code)\n"
              "    assert 'usage: latte ' + name in out.getvalue(), (name, out.getvalue()[:200])\n"
              "print('ok', len(latte_cli.SUBCOMMANDS))\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "ok 5"
