"""Load a checkpoint with vllm.LLM and exit (run by tests/test_vllm.py): a bad checkpoint must fail here.

    python load.py MODEL
"""
import sys


def main():
    from vllm import LLM

    LLM(model=sys.argv[1], max_model_len=512, enforce_eager=True)  # eager: a load failure comes before compiling
    print("loaded")


if __name__ == "__main__":  # vLLM spawns its engine process, which re-imports this module
    main()
