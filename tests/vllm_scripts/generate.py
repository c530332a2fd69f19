"""Greedy generation with vllm.LLM (run by tests/test_vllm.py in the serve environment).

    python generate.py MODEL PROMPTS.json OUT.json [--dtype float32] [--max-tokens 32]

PROMPTS.json is a list of token-id lists (the test tokenizes, so both engines see the same ids);
OUT.json gets the generated token ids per prompt. vLLM's default compilation is kept (no enforce_eager).
"""
import argparse
import json
import os

# apply_model below ships a function (by reference: an importable one) to the engine's worker, which
# vLLM only does with this set
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("prompts")
    parser.add_argument("out")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from lowrank_engine.vllm_plugin import factorized_layers

    with open(args.prompts) as f:
        prompts = json.load(f)
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=512, seed=0)
    # every layer the plugin factorized must run the low-rank method: a silent dense fallback would pass
    # an equivalence test only by accident
    factorized = llm.apply_model(factorized_layers)[0]
    sampling = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], sampling)
    result = {"tokens": [list(out.outputs[0].token_ids) for out in outputs],
              "factorized_layers": factorized,
              "compilation_mode": str(llm.llm_engine.vllm_config.compilation_config.mode)}
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":  # vLLM spawns its engine process, which re-imports this module
    main()
