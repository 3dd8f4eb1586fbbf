"""AndesVL tools: building repo folders, quantization, LoRA fine-tuning (QALFT), staged training, evaluation,
data sets and benchmarks, each module with a thin CLI (`python -m andesvl_tools.<module> --help`, from the repo root).

The remote code at the repo root (what `trust_remote_code` loads) never imports this package; the tools import the
model and processor the way users do, through transformers' Auto classes.

    build_repo     assemble an AndesVL Hub folder (code, config, tokenizer; optionally next to official weights)
    quantize       weight-only int8 / int4 base for the 1+N deployment
    finetune_lora  scenario LoRA adapters with the transformers Trainer (QALFT: against the quantized base)
    train          staged training of AndesVL-Tiny (vision warm-up, align, pretrain, sft)
    evaluate       greedy evaluation of a model and its adapters on the make_datasets tasks
    make_datasets  the offline AndesVL-Tiny data sets
    chat, demo     command-line chat; the quick-start demo
    benchmark      speed and memory ratios, measured side by side
    build_tokenizer, ship_tiny, folders   maintenance and the AndesVL-Tiny recipe's helpers
"""
