"""HF <-> Megatron checkpoint conversion for Qwen3-MoE and Qwen2-MoE.

Import from the module that owns each part (this package re-exports nothing, so importing
one part never imports the others):

* :mod:`.registry` ``adapter_for`` -> a :class:`.adapter.StateDictAdapter` (explicit key table
  per family, :mod:`.qwen3_moe`, :mod:`.qwen2_moe`) that maps single-process Megatron tensors to
  HF tensors and back, tensor by tensor (CLI and weight sync).
* :mod:`.pipeline` ``hf_to_megatron`` / ``megatron_to_hf``: streamed whole-checkpoint conversions.
* :mod:`.loading` ``load_megatron_checkpoint``: load a ``torch_dist`` checkpoint into model
  chunks built with any TP/PP/EP layout.
* :mod:`.sharding` ``global_megatron_name`` / ``merge_tp_shards``: turn a rank's parameters into
  the single-process tensors the adapter expects (weight sync from a parallel trainer).
"""
