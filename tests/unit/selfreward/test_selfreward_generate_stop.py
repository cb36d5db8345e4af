"""`generate` stops at the chat template's end of turn, on the three tokenizer families (SentencePiece
SOLAR: EOS; ChatML: <|im_end|>; Gemma: <end_of_turn>, which is not its EOS), with left-padded batches.

Each tiny random real model (tests/support/real_models.py) is first taught two conversations by a few dozen steps
of plain fp32 training, so greedy decoding writes the answer and then the end-of-turn token; the test then
checks that sampling returns exactly the answer, marked as stopped, and nothing after the marker.
"""

from __future__ import annotations

import pytest
import torch

from lowmem_sdpo.data import StepData, UnpairedExample, collate_unpaired, load_tokenizer, tokenize_step
from lowmem_sdpo.data.tokenizer import find_answer_end
from lowmem_sdpo.selfreward.generation import SampleSettings, generate_batch, stop_token_ids
from tests.support.real_models import _COMMON, ARCHS
from tests.support.real_tokenizers import build_family

# The architecture matters less than the tokenizer here; Gemma-2's soft-capped head (see real_models) learns
# too slowly for a few dozen steps, so the Gemma tokenizer drives a Mistral model.
FAMILY_ARCH = {"solar": "llama", "chatml": "qwen2", "gemma": "mistral"}
STEPS = 120  # enough for every family's model to write both answers and the marker after them
CONVERSATIONS = [
    ("What is the capital of France?", "Hello! Paris."),
    ("And of Italy?", "The capital of Italy is Rome."),  # a shorter prompt: left padding in the batch
]


def _taught_model(arch_name: str, tokenizer, tokenized) -> torch.nn.Module:
    import transformers

    arch = ARCHS[arch_name]
    config = getattr(transformers, arch.config_class)(
        **{
            **_COMMON,
            **arch.config,
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    )
    torch.manual_seed(0)
    model = getattr(transformers, arch.model_class)(config).float()
    batch = collate_unpaired(tokenized, tokenizer.pad_token_id)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    model.train()
    for _ in range(STEPS):
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        )
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("family", sorted(FAMILY_ARCH))
def test_generation_stops_at_the_end_of_turn(tmp_path, family):
    tokenizer = load_tokenizer(str(build_family(family, tmp_path)))
    step = StepData(
        label="stop",
        source="test",
        schema="unpaired",
        unpaired=[UnpairedExample([{"role": "user", "content": p}], a, True) for p, a in CONVERSATIONS],
    )
    tokenized = tokenize_step(step, tokenizer, max_length=64, max_prompt_length=48).unpaired
    end = find_answer_end(tokenizer)
    stops = stop_token_ids(tokenizer)
    # What ends an answer in training data is what sampling stops at.
    assert all(e.completion_ids[-1] in stops for e in tokenized)
    if family == "gemma":
        assert end.text == "<end_of_turn>" and tokenizer.convert_tokens_to_ids("<end_of_turn>") in stops
        assert tokenizer.eos_token_id != tokenizer.convert_tokens_to_ids("<end_of_turn>")
    model = _taught_model(FAMILY_ARCH[family], tokenizer, tokenized)

    prompts = [e.prompt_ids for e in tokenized]
    assert len(prompts[0]) != len(prompts[1])
    greedy = generate_batch(
        model, tokenizer, prompts, SampleSettings(n=1, temperature=0, max_new_tokens=30), 0
    )
    for row, (_, answer), example in zip(greedy, CONVERSATIONS, tokenized, strict=True):
        (completion,) = row
        assert completion.stopped
        assert completion.text.strip() == answer
        assert completion.tokens == len(example.completion_ids)  # the answer and its end marker, no more

    sampled = generate_batch(
        model, tokenizer, prompts, SampleSettings(n=3, temperature=0.7, max_new_tokens=30), 1
    )
    assert [len(row) for row in sampled] == [3, 3]
    assert all(c.stopped and c.tokens <= 30 for row in sampled for c in row)
