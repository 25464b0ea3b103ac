import pytest
import torch

from poisonlab.errors import PoisonlabError
from poisonlab.models import LADDER, build_model, chinchilla_tokens, count_module_parameters, get_size, parameter_count


@pytest.mark.parametrize("name", list(LADDER))
def test_exact_parameter_counts_match_the_built_model(name):
    size = get_size(name)
    with torch.device("meta"):
        model = build_model(size, 32000)
    counted = count_module_parameters(model)
    assert counted == parameter_count(size, 32000)
    assert model.config.model_type == "llama"


@pytest.mark.parametrize("name,nominal", [("600m", 600e6), ("2b", 2e9), ("7b", 7e9), ("13b", 13e9)])
def test_paper_sizes_and_chinchilla_budgets(name, nominal):
    pc = parameter_count(get_size(name), 32000)
    assert abs(pc.total - nominal) / nominal < 0.05
    tokens = chinchilla_tokens(pc.total)
    assert abs(tokens - 20 * nominal) / (20 * nominal) < 0.05  # 12B, 40B, 140B, 260B
    assert chinchilla_tokens(pc.total, data_multiplier=0.5) == round(pc.total * 10)


def test_llama2_shapes_are_exact():
    assert parameter_count(get_size("7b"), 32000).total == 6_738_415_616  # Llama-2-7B
    assert parameter_count(get_size("13b"), 32000).total == 13_015_864_320  # Llama-2-13B


def test_unknown_size():
    with pytest.raises(PoisonlabError, match="unknown model size 'huge'"):
        get_size("huge")


def test_weights_hash_follows_the_tensors_not_the_file_header(tmp_path):
    import torch

    from poisonlab.checkpoint import save_model_folder
    from poisonlab.models import build_model, get_size
    from poisonlab.provenance import file_sha256, weights_sha256

    torch.manual_seed(0)
    m = build_model(get_size("tiny"), 64, 0, 32)
    label = {"poisoned": False, "attack": None, "trigger": None, "poison_count": 0, "poisons_seen": 0,
             "placement": None}
    save_model_folder(tmp_path / "a", m, label)
    save_model_folder(tmp_path / "b", m, {**label, "poisons_seen": 1})  # other metadata, same tensors
    a, b = tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors"
    assert file_sha256(a) != file_sha256(b) and weights_sha256(a) == weights_sha256(b)
    with torch.no_grad():
        next(m.parameters()).view(-1)[0] += 1e-6
    save_model_folder(tmp_path / "c", m, label)
    assert weights_sha256(tmp_path / "c" / "model.safetensors") != weights_sha256(a)
