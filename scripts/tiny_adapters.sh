# The scenario-adapter settings of the AndesVL-Tiny recipe, sourced by train_tiny.sh and adapter_seeds.sh.
# Needs: py, root (the repo), data (make_datasets.py output), runs (work dirs), model (the base folder: adapters are
# written to $model/adapters/<name>), and a phase function.

# LoRA on the text model's linears (the encoder and projector are the warm-up's, frozen in the base stages).
# Group size 16 divides every in_features of this model.
LM_TARGETS='language_model\.model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)'
GROUP=16
SCALE_DTYPE=float16  # what the shipped *-qalft-int4 adapters trained against (the quantizer now defaults to bfloat16)

adapter() {  # name seed train-file eval-file steps [finetune_lora flags]
  local name="$1" seed="$2" train="$3" eval="$4" steps="$5"; shift 5
  if [ -f "$model/adapters/$name/adapter_model.safetensors" ]; then echo "adapters/$name: done"; return; fi
  local resume=()  # continue an interrupted run from its last checkpoint
  if compgen -G "$runs/adapter-$name/checkpoint-*" > /dev/null; then resume=(--resume); fi
  "$py" -m andesvl_tools.finetune_lora --model "$model" --name "$name" --dtype float32 --save-dtype bfloat16 \
    --train-file "$train" --eval-file "$eval" --lora-dropout 0.0 --target-modules "$LM_TARGETS" \
    --learning-rate 1e-3 --warmup-steps 30 --max-steps "$steps" --per-device-batch-size 8 \
    --num-threads 1 --seed "$seed" --base-model-id AndesVL-Tiny --work-dir "$runs/adapter-$name" \
    --output-dir "$model/adapters/$name" --save-steps 200 --eval-steps "$steps" --logging-steps 20 "${resume[@]}" \
    "$@" > "$runs/adapter-$name.log" 2>&1 \
    || { echo "adapters/$name failed: see $runs/adapter-$name.log" >&2; return 1; }
  echo "adapters/$name: $(tail -c 300 "$runs/adapter-$name.log" | tr '\n' ' ')"
}

# Every adapter is LoRA on the text model's linears and nothing else: no full module copies (modules_to_save) and no
# trained token rows. That is the one form every serving path takes: peft's load_adapter / set_adapter, mixed
# per-row batches (adapter_names=) and hotswap, vLLM's per-request LoRA and the exported ExecuTorch programs.
# Measured on the earlier recipe, the answer-token rows and a projector copy lifted held-out OCR numbers from 7.6% to
# 29.5%, but they made the ocr adapter unservable in a mixed batch with gui and by vLLM (AndesVL-Tiny/README.md).
# ocr: rank 32 on the number images. gui: rank 16, 1,200 steps (measured: rank 8 and 400 steps reached 0%).
adapter_pairs() {  # seed suffix: ocr, ocr-qalft-int4, gui, gui-qalft-int4 (each name + suffix), trained with that seed
  local seed="$1" suffix="$2" first second
  local ocr=("$data/ocr/train-numbers.jsonl" "$data/ocr/val-numbers.jsonl" 2000 --lora-rank 32 --lora-alpha 64)
  local gui=("$data/gui/train.jsonl" "$data/gui/val.jsonl" 1200 --lora-rank 16 --lora-alpha 32)
  # Two single-threaded trainings at a time use both cores better than one two-threaded one.
  phase "adapters: ocr$suffix (plain LoRA | QALFT int4), seed $seed"
  adapter "ocr$suffix" "$seed" "${ocr[@]}" & first=$!
  adapter "ocr-qalft-int4$suffix" "$seed" "${ocr[@]}" --qalft int4 --qalft-group-size "$GROUP" --qalft-scale-dtype "$SCALE_DTYPE" & second=$!
  wait "$first"; wait "$second"
  phase "adapters: gui$suffix (plain LoRA | QALFT int4), seed $seed"
  adapter "gui$suffix" "$seed" "${gui[@]}" & first=$!
  adapter "gui-qalft-int4$suffix" "$seed" "${gui[@]}" --qalft int4 --qalft-group-size "$GROUP" --qalft-scale-dtype "$SCALE_DTYPE" & second=$!
  wait "$first"; wait "$second"
}
