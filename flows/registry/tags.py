"""The names of every tag FIGAN reads or writes on a model version or an explanation run, and the fixed names
(statuses, experiments) that go with them."""
from __future__ import annotations

import re

from models import layout

# contract (model version, falling back to the registered model)
TAG_DATASET = "figan.dataset"
TAG_DATASET_MD5 = "figan.dataset_md5"
TAG_TARGET = "figan.target"
TAG_TASK = "figan.task"
TAG_LAYER = "figan.layer"
TAG_LAYERS = "figan.layers"                # optional: "auto" or a JSON list of candidate layers chosen among by FID
TAG_LAYER_CHOSEN = "figan.layer_chosen"    # the candidate the FID selection kept (set by the flow)
TAG_INPUT_SHAPE = "figan.input_shape"
TAG_CLASS_NAMES = "figan.class_names"
TAG_EXPLAIN = "figan.explain"
# explanation status (model version)
TAG_STATUS = "figan.status"
TAG_RUN_ID = "figan.run_id"
TAG_ERROR = "figan.error"
TAG_KEY = "figan.key"
TAG_UPDATED = "figan.updated"
TAG_FID_BEST = "figan.fid_best"
TAG_FID_EXTRACTOR = "figan.fid_extractor"
TAG_FAITHFULNESS = "figan.faithfulness"
TAG_PCT_VARIANCE = "figan.pct_variance"
TAG_VERDICT = "figan.verdict"              # pass | fail: <failing gates, comma-separated>
TAG_MANIFEST = "figan.manifest_sha256"     # sha256 of the published run's signed manifest (models.audit)
# retry bookkeeping and the explain run's progress (model version)
TAG_ATTEMPTS = "figan.attempts"            # failed attempts for the current key
TAG_RETRY_AFTER = "figan.retry_after"      # epoch seconds before which a failed key is not retried
TAG_ERROR_KIND = "figan.error_kind"        # contract | transient | program | crash (flows.failures)
TAG_CONTRACT_HASH = "figan.contract_hash"  # fingerprint of the contract tags a contract error was raised on
TAG_PROGRAM_HASH = "figan.program_hash"    # fingerprint of the code, config and contract a programming error was
                                           # raised on (flows.failures.program_fingerprint)
TAG_TRUST = "figan.trust"                  # "pickle": the CNN was unpickled (its registrant's code ran)
TAG_PROGRESS = "figan.progress"            # JSON {flow_run, stage, step, at}: where the explain run is now
TAG_LAST_GOOD_RUN_ID = "figan.last_good_run_id"   # the version's last published (done) run, kept while it is
TAG_LAST_GOOD_KEY = "figan.last_good_key"         # re-explained or a re-run failed: what the service serves then
# explanation run tags
RUN_TAG_MODEL = "figan.model"
RUN_TAG_VERSION = "figan.version"
RUN_TAG_KEY = "figan.key"
RUN_TAG_MANIFEST = "figan.manifest_sha256"
RUN_TAG_CNN_ID = "figan.cnn_id"           # cnn_identity() of the version the run explains
LINEAGE_TAG_PREFIX = "lineage."

STATUSES = ("queued", "running", "done", "failed")
TASKS = ("regression", "classification")
EXPLANATIONS_EXPERIMENT = "figan-explanations"
CNN_EXPERIMENT = "figan-cnns"

# set_status(**fields) keyword → tag; lists are stored as JSON
_STATUS_FIELDS = {"run_id": TAG_RUN_ID, "error": TAG_ERROR, "key": TAG_KEY, "fid_best": TAG_FID_BEST,
                  "fid_extractor": TAG_FID_EXTRACTOR, "faithfulness": TAG_FAITHFULNESS,
                  "pct_variance": TAG_PCT_VARIANCE, "attempts": TAG_ATTEMPTS, "retry_after": TAG_RETRY_AFTER,
                  "error_kind": TAG_ERROR_KIND, "contract_hash": TAG_CONTRACT_HASH, "program_hash": TAG_PROGRAM_HASH,
                  "verdict": TAG_VERDICT, "manifest_sha256": TAG_MANIFEST}
_MAX_ERROR_CHARS = 4000

# artifact layout
MODEL_NAME_IN_RUN = "model"                 # log_model(name=...)
SPEC_FILE, WEIGHTS_FILE = "cnn.json", "cnn.pt"
PICKLE_ALLOWLIST_ENV = "FIGAN_PICKLE_ALLOWLIST"
SAFE_PICKLE_MODULES = frozenset({"pickle", "cloudpickle", "mlflow.pytorch.pickle_module"})
MANIFEST_PATH = layout.MANIFEST                  # the signed manifest, logged last
SERVED_ARTIFACTS = layout.SERVED_ARTIFACTS       # what download_explanation fetches (and a service checks)
# run metrics also logged against the CNN's LoggedModel (MLflow 3), so they show on the CNN's model page
_MODEL_METRICS_RE = re.compile(r"^(fid_best|fid_floor|verdict_pass|c\d+_(faithfulness_rho_mean|pct_target_variance))$")

_MD5_RE = re.compile(r"^[0-9a-f]{32}(\.dir)?$")
_LOGGED_MODEL_SOURCE_RE = re.compile(r"models:/(m-[0-9a-f]{32})")
_METRIC_BAD_CHARS = re.compile(r"[^\w./\- :]")
