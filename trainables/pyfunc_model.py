"""The MLflow pyfunc model of a qlora-tune classifier, logged as *models from code*: MLflow stores
this file, not a pickle. Its artifact ``model_dir`` is the output-folder layout (adapter,
tokenizer, labels, config); ``load_context`` rebuilds the (quantized) base and attaches the adapter,
so predictions are exactly those of the trained model."""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd


class QloraClassifierModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from trainables.predict import Classifier

        self.clf = Classifier(context.artifacts["model_dir"])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """A ``text`` column (else the first column) in; ``label`` and ``p_<label>`` columns out."""
        if isinstance(model_input, pd.DataFrame):
            col = "text" if "text" in model_input.columns else model_input.columns[0]
            texts = model_input[col].astype(str).tolist()
        else:
            texts = [str(t) for t in model_input]
        return pd.DataFrame(self.clf.predict(texts).records())


mlflow.models.set_model(QloraClassifierModel())
