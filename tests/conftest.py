import pytest


@pytest.fixture(scope="session")
def world_tokenizer():
    from perceive.tokenization import build_world_tokenizer, world_vocabulary

    return build_world_tokenizer(world_vocabulary(n_scenes=60))


@pytest.fixture(scope="session")
def micro_config(world_tokenizer):
    """A model small enough for unit tests (a few hundred thousand parameters)."""
    from perceive.models.chatrex.configuration_chatrex import ChatRexConfig
    from perceive.tokenization import ASSISTANT, IMAGE, OBJ_TOKENS, ROI
    from perceive.train.data import world_model_options

    ids = world_tokenizer.convert_tokens_to_ids
    return ChatRexConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "patch_size": 16},
        convnext_config={"hidden_sizes": [8, 16, 32], "depths": [1, 1, 1]},
        text_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "vocab_size": len(world_tokenizer), "max_position_embeddings": 512,
                     "tie_word_embeddings": False},
        upn_config={"image_size": 128, "hidden_sizes": [8, 16, 32], "depths": [1, 1, 1], "head_dim": 16},
        low_resolution=64, high_resolution=128, object_dim=64, position_dim=32, box_tokens="fused",
        index_token_features=True,
        image_token_id=ids(IMAGE), roi_token_id=ids(ROI), assistant_token_id=ids(ASSISTANT),
        obj_token_ids=[ids(t) for t in OBJ_TOKENS],
        # the world's four attributes of an object's own (what it holds is a test's to add)
        **world_model_options(["category", "color", "pattern", "size"]),
    )  # fmt: skip
