"""The conversion wing: a softmax transformer's checkpoint into a T2R model, and its new tensors fitted.

* :mod:`.swap` -- which tensors a checkpoint must provide and which the swap adds (feature maps, the hybrid's
  window factor), the identity record of every feature map, and the one-line refusals (``SwapError``) when a
  checkpoint does not fit the model it is loaded into;
* :mod:`.calibration` -- the swapped layers' new tensors fitted to the teacher's attention on a few batches
  before finetuning (``python -m t2r_fairseq.tools.convert``).
"""
