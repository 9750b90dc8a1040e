"""Tiny KerasHub backbones built from constructor arguments (random weights, offline)."""

import keras_hub

V = 128  # vocabulary size

FAMILIES = {
    "gpt2": (keras_hub.models.GPT2Backbone, keras_hub.models.GPT2CausalLM,
             dict(vocabulary_size=V, num_layers=2, num_heads=2, hidden_dim=32, intermediate_dim=64, max_sequence_length=32, dropout=0.0)),
    "gemma": (keras_hub.models.GemmaBackbone, keras_hub.models.GemmaCausalLM,
              dict(vocabulary_size=V, num_layers=2, num_query_heads=2, num_key_value_heads=1, hidden_dim=32, intermediate_dim=64, head_dim=16)),
    "gemma3": (keras_hub.models.Gemma3Backbone, keras_hub.models.Gemma3CausalLM,
               dict(vocabulary_size=V, image_size=16, num_layers=2, num_query_heads=2, num_key_value_heads=1, hidden_dim=32, intermediate_dim=64, head_dim=16, vision_encoder=None)),
    "llama": (keras_hub.models.LlamaBackbone, keras_hub.models.LlamaCausalLM,
              dict(vocabulary_size=V, num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=32, intermediate_dim=64)),
    "llama3": (keras_hub.models.Llama3Backbone, keras_hub.models.Llama3CausalLM,
               dict(vocabulary_size=V, num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=32, intermediate_dim=64)),
    "mistral": (keras_hub.models.MistralBackbone, keras_hub.models.MistralCausalLM,
                dict(vocabulary_size=V, num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=32, intermediate_dim=64)),
    "qwen": (keras_hub.models.QwenBackbone, keras_hub.models.QwenCausalLM,
             dict(vocabulary_size=V, num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=32, intermediate_dim=64)),
    "qwen3": (keras_hub.models.Qwen3Backbone, keras_hub.models.Qwen3CausalLM,
              dict(vocabulary_size=V, num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=32, intermediate_dim=64, head_dim=8)),
    "phi3": (keras_hub.models.Phi3Backbone, keras_hub.models.Phi3CausalLM,
             dict(vocabulary_size=V, num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=32, intermediate_dim=64)),
    "bert": (keras_hub.models.BertBackbone, None,
             dict(vocabulary_size=V, num_layers=2, num_heads=2, hidden_dim=32, intermediate_dim=64, max_sequence_length=32, dropout=0.0)),
}


def token_inputs(model, batch=2, length=6, seed=0):
    """Random token ids for a backbone or a task (with `segment_ids` for BERT)."""
    import numpy as np

    ids = np.random.default_rng(seed).integers(1, V, size=(batch, length)).astype("int32")
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids, dtype="bool")}
    backbone = getattr(model, "backbone", model)
    if "segment_ids" in [i.name for i in backbone.inputs]:
        x["segment_ids"] = np.zeros_like(ids)
    return x


def hidden(model, x):
    """A model's output as NumPy (a backbone's `sequence_output` for BERT)."""
    from keras import ops

    out = model(x)
    return ops.convert_to_numpy(out["sequence_output"] if isinstance(out, dict) else out)
