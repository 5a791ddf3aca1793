import pytest

from moespeed import config as C
from moespeed.cli import build_parser, main
from moespeed.errors import ConfigError


def test_presets_are_valid_and_small_is_about_100m_parameters():
    from moespeed import Transformer
    for name in C.PRESETS:
        C.preset_config(name).validate()
    cfg = C.preset_config("small")
    cfg.model.vocab_size = cfg.data.vocab_size
    n = sum(p.numel() for p in Transformer(cfg.model).parameters())
    assert 80e6 < n < 150e6


@pytest.mark.parametrize("key, value, fragment", [
    ("model.n_layer", "3", "unknown config key 'model.n_layer'"),
    ("modle.n_layers", "3", "unknown config key 'modle.n_layers'"),
    ("model.n_layers", "three", "model.n_layers = 'three': must be an integer"),
    ("model.n_layers", "0", "model.n_layers = 0: must be a positive integer"),
    ("model.qk_rope_head_dim", "7", "must be a positive even number"),
    ("model.kv_lora_rank", "-1", "model.kv_lora_rank = -1"),
    ("model.qk_norm", "maybe", "must be true or false"),
    ("train.schedule", "linear", "train.schedule = 'linear': must be one of cosine, wsd"),
    ("train.muon_ns_lowest", "0", "train.muon_ns_lowest = 0.0: must be in (0, 1)"),
    ("train.muon_ns_coefficients", "quintic", "train.muon_ns_coefficients = 'quintic': must be one of standard, polar_express"),
    ("data.val_fraction", "1.5", "data.val_fraction = 1.5: must be in (0, 1)"),
    ("train.beta2", "1", "train.beta2 = 1.0: must be in [0, 1)"),
    ("data.cache_dir", "", "data.cache_dir is empty: give a folder"),
    ("model.ffn_pattern", "dense,sparse", "model.ffn_pattern"),
    ("model.peer.num_experts", "100", "model.peer.num_experts = 100"),
])
def test_bad_values_name_the_key(key, value, fragment):
    with pytest.raises(ConfigError, match=None) as err:
        C.build_config("quickstart", None, [(key, value)])
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key, value", [
    ("train.lr", "inf"), ("train.muon_lr", "-inf"), ("train.weight_decay", "inf"), ("train.grad_clip", "nan"),
    ("model.init_std", "inf"), ("model.rope_theta", "inf"), ("data.val_fraction", "nan"),
    ("model.moe.route_scale", "inf"), ("model.moe.capacity_factor", "inf"),
])
def test_non_finite_floats_are_rejected(key, value):
    with pytest.raises(ConfigError) as err:
        C.build_config("quickstart", None, [(key, value)])
    assert str(err.value) == f"{key} = {float(value)}: must be a finite number"


def test_non_finite_float_in_toml_is_rejected(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[train]\nlr = inf\n")
    with pytest.raises(ConfigError, match=r"^train.lr = inf: must be a finite number$"):
        C.build_config(None, str(path))


@pytest.mark.parametrize("device", ["cudaX", "cuda:abc", "cuda:", "cuda:-1", "CPU", "mps", ""])
def test_bad_device_is_rejected(device):
    with pytest.raises(ConfigError, match=r"^train.device = .*: must be auto, cpu, cuda or cuda:N"):
        C.build_config("quickstart", None, [("train.device", device)])


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_good_devices_are_accepted(device):
    assert C.build_config("quickstart", None, [("train.device", device)]).train.device == device


def test_misspelled_toml_key_suggests_the_closest_key(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[model]\nd_mode = 64\n")
    with pytest.raises(ConfigError) as err:
        C.build_config(None, str(path))
    assert str(err.value) == "unknown config key 'model.d_mode': did you mean d_model?"
    path.write_text("[model]\nxyz = 64\n")  # nothing close: list the section's keys
    with pytest.raises(ConfigError, match="unknown config key 'model.xyz': model has keys .*d_model, "):
        C.build_config(None, str(path))


def test_seq_len_longer_than_context_is_rejected():
    with pytest.raises(ConfigError, match="data.seq_len = 512: must be <= model.max_seq_len"):
        C.build_config("quickstart", None, [("data.seq_len", "512")])


def test_toml_file_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('preset = "quickstart"\n[model]\nn_layers = 3\nd_model = 64\n[train]\nlr = 0.01\n')
    cfg = C.build_config(None, str(path), [("model.n_layers", "5")])
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.train.lr) == (5, 64, 0.01)
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nn_layers = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        C.build_config(None, str(bad))
    with pytest.raises(ConfigError, match="not found"):
        C.build_config(None, str(tmp_path / "missing.toml"))


def test_to_toml_round_trips():
    import tomllib
    cfg = C.build_config("quickstart-peer", None, [("data.data", ["a.txt", "b/"]), ("model.n_layers", "2")])
    again = C.config_from_dict(tomllib.loads(C.to_toml(cfg)))
    assert again == cfg


def test_a_run_saved_with_a_removed_option_still_loads_but_the_option_is_refused_anew():
    import tomllib
    cfg = C.build_config("quickstart", None, [("train.steps", "7")])
    saved = tomllib.loads(C.to_toml(cfg).replace("[train]\n", "[train]\nmuon_fuse_update = false\n"))
    assert saved["train"]["muon_fuse_update"] is False
    assert C.config_from_dict(saved) == cfg
    assert "muon_fuse_update" in saved["train"]  # the caller's dict is left as it was
    with pytest.raises(ConfigError, match=r"train.muon_fuse_update was removed \(.*\): delete it"):
        C.build_config("quickstart", None, [("train.muon_fuse_update", "true")])


def test_nested_defaults_are_not_shared():
    a, b = C.Config(), C.Config()
    a.model.peer.product_key_dim.append(5)
    a.data.data.append("x")
    assert b.model.peer.product_key_dim == [128, 128] and b.data.data == []


def test_help_lists_every_option_with_its_doc(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    out = capsys.readouterr().out
    for key, _, _, doc, _ in C.iter_options():
        assert f"--{key}" in out
        assert doc.split()[0] in out


def test_cli_config_error_is_one_line_and_exit_2(capsys):
    assert main(["train", "--model.n_layers", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "moespeed: error: model.n_layers = 'x': must be an integer"
    assert main(["train", "--model.n_layer", "3"]) == 2
    assert "unrecognized arguments: --model.n_layer" in capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [
    (["train", "--model.d_mode", "64"],
     "unrecognized arguments: --model.d_mode 64: did you mean --model.d_model? (see `moespeed train --help` for every option)"),
    (["prepare", "--train.rl=1", "--modle.n_layers", "2"],
     "unrecognized arguments: --train.rl=1 --modle.n_layers 2: did you mean --train.lr or --model.n_layers? "
     "(see `moespeed prepare --help` for every option)"),
    (["train", "--model.xyz", "3"], "unrecognized arguments: --model.xyz 3 (see `moespeed train --help` for every option)"),
    (["generate", "--prompt", "x", "--temprature", "0.5"],
     "unrecognized arguments: --temprature 0.5: did you mean --temperature? (see `moespeed generate --help` for every option)"),
], ids=["config-key", "two-options", "nothing-close", "generate-option"])
def test_misspelled_option_suggests_the_closest_and_the_command_help(capsys, argv, expected):
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"moespeed: error: {expected}"


def test_config_reference_doc_is_current():
    from pathlib import Path
    doc = Path(__file__).resolve().parent.parent / "docs" / "config.md"
    assert doc.read_text() == C.options_markdown(), "regenerate docs/config.md (see options_markdown's docstring)"
