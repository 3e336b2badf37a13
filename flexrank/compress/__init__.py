"""flexrank.compress: from a pretrained model to an elastic checkpoint.

Model loading (`models`), calibration data (`calibration`), activation covariances
(`covariance`), DataSVD maths (`decompose`), nested layers (`layers`), which layers are
factorised (`select`), the in-place module swap (`surgery.factorize_`), sensitivity
probing (`probe`), nested distillation (`distill`), the `ElasticModel` checkpoint
(`elastic`), per-budget costs of a model (`budget_cost`), quality metrics (`evaluate`)
and the resumable `compress` pipeline (`pipeline`). May import flexrank.planning and torch.
"""
