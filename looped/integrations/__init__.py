"""looped's models in other libraries' terms: `hf` (a transformers model directory, `looped
export`) and `lm_eval_model` (lm-evaluation-harness scoring through looped's own forward,
`looped lm-eval`). Each needs an optional extra (`export`, `lm-eval`); nothing else in looped
imports them at start-up."""
