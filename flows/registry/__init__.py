"""The adapter between FIGAN and the MLflow Model Registry: the registered-CNN contract and published explanations.

A package along the registry's concerns: :mod:`.tags` (every tag name), :mod:`.contract`, :mod:`.cnn` (storing and
loading CNNs), :mod:`.status`, :mod:`.explanations` and :mod:`.client` (shared MLflow helpers and value formats).
Everything public is re-exported here: ``from flows import registry as R; R.set_status(...)``.

This is the only package that knows tag names and the artifact layout; flows/ and services/ call its functions and
never spell a ``figan.*`` tag or an artifact path themselves.

**The contract** (what the explanation flow needs to know about a registered CNN) lives in tags, read from the
model version, falling back to the registered model (version tags win), so a team can set dataset/task once on
the model and override per version:

=====================  ========================================================================  ==========
tag                    meaning                                                                   required
=====================  ========================================================================  ==========
``figan.dataset``      dataset name (the DVC-versioned folder the CNN is explained on)           yes
``figan.dataset_md5``  DVC md5 of that dataset version (``<32 hex>`` or ``<32 hex>.dir``)        no
``figan.target``       target column (or a JSON list of columns)                                 yes
``figan.task``         ``regression`` or ``classification``                                      yes
``figan.layer``        layer whose output is explained (default: input of the final Linear)      no
``figan.input_shape``  JSON ``[C, H, W]`` the CNN takes                                          yes
``figan.class_names``  JSON list of class names                                                  no
``figan.explain``      ``true``: opt in to automatic explanation                                 no
=====================  ========================================================================  ==========

A missing or malformed tag is a :class:`ContractError` whose message names the version and the tag, so the flow
can mark just that version failed with a message a data scientist can act on.

**The CNN's identity** (:func:`cnn_identity`): a hash of what the registry fixed when the version was created
(its creation time, source URI, run id and MLflow 3 model id). A name and version number do not name a CNN: a
registered model deleted and re-created starts again at version 1. The identity is part of the explanation key,
tags every explanation run (``figan.cnn_id``) and is checked by whoever serves one, so the new version 1 is never
served, nor resumed from, the old one's explanation.

**Status** of a version's explanation is kept in version tags: ``figan.status`` (queued | running | done |
failed), ``figan.run_id``, ``figan.error``, ``figan.key`` (the idempotency key), ``figan.updated`` (ISO time)
and headline metrics (``figan.fid_best``, ``figan.fid_extractor``, ``figan.faithfulness`` and
``figan.pct_variance`` as JSON lists, one entry per PLS component) and the verdict ``figan.verdict``: ``pass``,
or ``fail: fid, diversity`` naming the failing gates (from ``metrics.json``'s ``verdict``, see
:func:`models.verdict.verdict_of`), and ``figan.manifest_sha256``, the digest of the run's signed manifest (what
``figan verify`` and the service check the run against). ``done`` means published; the verdict says whether to trust it. Status is
written last, so whoever sees ``done`` also sees the run id, the metrics and the verdict. With the setting
``pass_alias`` (``FIGAN_PASS_ALIAS``) publishing also points that registered-model alias at the version when its
verdict is pass (and takes it off the version when a re-explanation fails), so ``models:/<name>@<alias>`` only
ever names explanations that passed (:func:`apply_pass_alias`). A failure also records ``figan.error_kind``
(contract | transient | program | crash, :mod:`flows.failures`), ``figan.attempts`` and ``figan.retry_after`` (the
trigger's backoff) and, for contract errors, ``figan.contract_hash`` (not retried until the contract tags change),
for programming errors ``figan.program_hash`` (not retried until the code, config or contract tags change).
``figan.progress`` says where the version's explain run is (stage, GAN step, when; :func:`write_progress`): the
worker names it when that run crashes and cancels the run when it stops moving.
``figan.last_good_run_id`` and ``figan.last_good_key`` name the version's last published run and its key: set
whenever the status becomes ``done`` and left alone by every other status, so while a version is re-explained
(queued, running) or its re-run failed the service keeps serving that run.

**How a CNN is stored.** :func:`register_cnn` logs the model with ``mlflow.pytorch.log_model`` in the
``pt2`` (torch.export) format, chosen explicitly: pickle-free, and a standard MLflow model that MLflow itself can
load and serve. Its input example has batch size 2 so the exported batch dimension stays dynamic (a batch-1
example would freeze it at 1). A torch.export program, however, is a flat graph: its ``named_modules()`` no
longer contain ``nn.Linear`` layers and module hooks never fire, so FIGAN cannot read features from it. The
model therefore also carries ``extra_files/cnn.json`` (the :class:`~models.cnn.CNNSpec`) and
``extra_files/cnn.pt`` (a state dict, loaded with ``weights_only=True``), and :func:`load_cnn_version` rebuilds the
eager ``nn.Module`` from them: exact, hookable, any batch size, and no code unpickled. CNNs registered the
plain MLflow way load too (:func:`load_cnn_version`): a ``pt2`` program is explained from its graph, a pickled
eager model only under the pickle policy (:func:`pickle_allowed`), a TorchScript model is refused with what to
register instead.

**An explanation** is one run in the ``figan-explanations`` experiment holding the artifacts folder written by
``models.explain.explain`` (minus the GAN's training checkpoints and the cached features, which are large and
only needed to resume), the flattened metrics as run metrics (the FID trace as a step series), lineage as
``lineage.*`` run tags plus ``lineage.json``, the DVC dataset and (MLflow 3) the CNN's LoggedModel as run inputs,
the headline metrics (FID, faithfulness, % variance, the verdict as ``verdict_pass``) also against that LoggedModel
so they show on the CNN's model page, and last a signed manifest ``audit/manifest.json`` of every file and of the inputs
(:mod:`models.audit`), whose sha256 is the tag ``figan.manifest_sha256`` on the run and the version. Images are plain
artifact files, which the MLflow UI's artifact viewer displays.
"""

from __future__ import annotations

# The public API, re-exported from the modules that own it (every public name of each).
from .client import *  # noqa: E402,F401,F403
from .cnn import *  # noqa: E402,F401,F403
from .contract import *  # noqa: E402,F401,F403
from .explanations import *  # noqa: E402,F401,F403
from .status import *  # noqa: E402,F401,F403
from .tags import *  # noqa: E402,F401,F403

__all__ = [
    "TAG_DATASET", "TAG_DATASET_MD5", "TAG_TARGET", "TAG_TASK", "TAG_LAYER", "TAG_INPUT_SHAPE", "TAG_CLASS_NAMES",
    "TAG_EXPLAIN", "TAG_LAYERS", "TAG_LAYER_CHOSEN", "TAG_STATUS", "TAG_RUN_ID", "TAG_ERROR", "TAG_KEY", "TAG_UPDATED", "TAG_FID_BEST",
    "TAG_FID_EXTRACTOR", "TAG_FAITHFULNESS", "TAG_PCT_VARIANCE", "STATUSES", "EXPLANATIONS_EXPERIMENT",
    "CNN_EXPERIMENT", "ContractError", "Contract", "DVCDatasetSource", "read_contract", "contract_of", "explain_requested",
    "register_cnn", "load_cnn_version", "pickle_allowed", "TAG_TRUST", "set_status", "get_status", "publish_explanation", "find_explanation",
    "download_explanation", "list_versions", "flatten_metrics", "TAG_ATTEMPTS", "TAG_RETRY_AFTER", "TAG_ERROR_KIND",
    "TAG_CONTRACT_HASH", "TAG_PROGRAM_HASH", "TAG_PROGRESS", "contract_fingerprint", "write_progress",
    "TAG_VERDICT", "verdict_tag", "parse_verdict_tag", "apply_pass_alias",
    "run_verdict", "logged_model_id", "TAG_MANIFEST", "RUN_TAG_MANIFEST", "MANIFEST_PATH", "SERVED_ARTIFACTS",
    "run_manifest_sha256", "cnn_identity", "RUN_TAG_CNN_ID", "VersionReplacedError", "TAG_LAST_GOOD_RUN_ID",
    "TAG_LAST_GOOD_KEY", "version_row",
]
