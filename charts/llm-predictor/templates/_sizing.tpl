{{/*
llm-predictor.plan: the deployment plan as JSON, computed once per render: the first call stores it on
the root context (key llmPredictorPlan; Helm hands every template of the chart the same root), later
calls return the stored text. Takes the root context; use it as
  {{- $plan := include "llm-predictor.plan" . | fromJson }}
and hand $plan to the helpers that need it (dict "plan" $plan "context" $).
*/}}
{{- define "llm-predictor.plan" -}}
{{- if not (hasKey . "llmPredictorPlan") }}
{{- $_ := set . "llmPredictorPlan" (include "llm-predictor.computePlan" .) }}
{{- end }}
{{- get . "llmPredictorPlan" }}
{{- end }}

{{/*
llm-predictor.dtypeBytes: bytes per element of a dtype the chart knows (float32, float16, bfloat16), as a
float; predictor/model_facts.py's DTYPE_BYTES holds the same numbers. Takes the dtype name.
*/}}
{{- define "llm-predictor.dtypeBytes" -}}
{{- get (dict "float32" 4.0 "float16" 2.0 "bfloat16" 2.0) . | default 0.0 }}
{{- end }}

{{/*
llm-predictor.catalogFacts: what the sizing needs of a catalog entry, as JSON: heads, kvHeads, layers,
headDim (hidden_size / num_attention_heads), weightBytes, maxContext, dtype, defaultTp, chatTemplate,
source. Takes (dict "name" <catalog name> "entry" <its catalog.yaml entry>).
*/}}
{{- define "llm-predictor.catalogFacts" -}}
{{- $e := .entry }}
{{- $heads := int $e.num_attention_heads }}
{{- dict "heads" $heads "kvHeads" (int $e.num_key_value_heads) "layers" (int $e.num_hidden_layers) "headDim" (div (int $e.hidden_size) $heads) "weightBytes" $e.weight_bytes "maxContext" $e.max_context "dtype" $e.dtype "defaultTp" ($e.default_tensor_parallel_size | default 1) "chatTemplate" ($e.chat_template | default "") "source" (printf "catalog entry %s" .name) | toJson }}
{{- end }}

{{/*
llm-predictor.kvBytesPerTokenPerRank: the KV cache bytes one token takes on one tensor-parallel rank,
the rule of predictor/model_facts.py's kv_bytes_per_token (tests check they agree for every catalog
model):
  2 (K and V) x layers x max(1, kvHeads / tp) x headDim x dtype bytes
where each rank holds kvHeads / tp KV heads (a model with fewer KV heads than ranks replicates one
per rank). A custom model gives its whole-model kvBytesPerToken instead of layers and headDim; its
per-head share is the same rule. Takes (dict "facts" <llm-predictor.catalogFacts or the custom facts>
"tp" <int> "dtype" <serving dtype: auto, float32, float16, bfloat16>). Returns an integer, 0 when the
facts do not say.
*/}}
{{- define "llm-predictor.kvBytesPerTokenPerRank" -}}
{{- $f := .facts }}
{{- $kvHeads := int ($f.kvHeads | default 0) }}
{{- $dtype := ternary $f.dtype .dtype (eq .dtype "auto") }}
{{- $headsPerRank := max 1 (div $kvHeads (int .tp)) }}
{{- if and $f.layers $f.headDim $kvHeads }}
{{- mul 2 (int $f.layers) $headsPerRank (int $f.headDim) (int (include "llm-predictor.dtypeBytes" $dtype)) }}
{{- else if and $f.kvBytesPerToken $kvHeads }}
{{- /* custom facts are counted in their own dtype; the serving dtype scales them */}}
{{- $factor := 1.0 }}
{{- if and (ne .dtype "auto") (float64 (include "llm-predictor.dtypeBytes" $f.dtype)) }}
{{- $factor = divf (include "llm-predictor.dtypeBytes" .dtype) (include "llm-predictor.dtypeBytes" $f.dtype) }}
{{- end }}
{{- ceil (mulf (divf $f.kvBytesPerToken $kvHeads) $headsPerRank $factor) | int64 }}
{{- else }}
{{- 0 }}
{{- end }}
{{- end }}

{{/*
llm-predictor.computePlan: the deployment plan, as JSON: served name, tensor parallel layout and the
GPU sizing check. Takes the root context; returns
  {"modelName", "tp", "nodes", "gpusPerPod", "chatTemplate", "weightBytes",
   "kvBytesPerTokenPerRank", "kvCacheBytesPerRank", "kvSource", "kvBudgetBytesPerRank",
   "perGpuBytes", "startupFailureThreshold"}
where kvCacheBytesPerRank is the KV cache the fit check counts (model.kvCacheBytes when set, else the
estimate of sizing.kvSequences sequences of maxModelLen tokens), kvSource says which ("kvCacheBytes",
"gpuMemoryUtilization" or "predictor default" on CPU), and kvBudgetBytesPerRank is, with
gpuMemoryUtilization, the most the predictor can give the KV cache: that share of the GPU less the
weights (the activations of its profiling forward come off that too).
Call it through llm-predictor.plan, which computes it once per render.

It reads the model's entry from catalog.yaml (a copy of the image build's catalog,
predictor/tools/catalog.yaml; the chart's tests check they are the same) or model.custom, and fails the install with a clear message when
  - the tensor parallel size does not divide the attention heads and the KV heads,
  - a pod would need more GPUs than a node has,
  - one GPU cannot hold its share of the weights plus the KV cache estimate plus overhead,
  - model.gpuMemoryUtilization of a GPU cannot hold its share of the weights plus one sequence,
  - the replica / multi-node settings contradict each other,
  - or, with gpu.enabled=false, the nodeSelector, tolerations or required node affinity still name the GPU
    vendor's labels (the domain of gpu.resourceName, e.g. nvidia.com/).
Every number from values or the catalog arrives as float64 (Helm decodes YAML numbers so).
*/}}
{{- define "llm-predictor.computePlan" -}}
{{- $v := .Values }}
{{- $m := $v.model }}
{{- $GiB := 1073741824.0 }}

{{- /* ---- model facts: catalog entry or custom ---- */}}
{{- $facts := dict }}
{{- $catalog := (.Files.Get "catalog.yaml" | fromYaml) }}
{{- $models := (get $catalog "models") | default dict }}
{{- if $m.catalogName }}
{{- if not (hasKey $models $m.catalogName) }}
{{- fail (printf "model.catalogName %q is not in the chart's catalog.yaml (known: %s). For a model that is not in the catalog, leave model.catalogName empty and describe it in model.custom." $m.catalogName (keys $models | sortAlpha | join ", ")) }}
{{- end }}
{{- $facts = include "llm-predictor.catalogFacts" (dict "name" $m.catalogName "entry" (index $models $m.catalogName)) | fromJson }}
{{- else }}
{{- $c := $m.custom | default dict }}
{{- $facts = dict "heads" ($c.numAttentionHeads | default 0) "kvHeads" ($c.numKeyValueHeads | default 0) "weightBytes" ($c.weightBytes | default 0) "kvBytesPerToken" ($c.kvBytesPerToken | default 0) "maxContext" ($c.maxContext | default 0) "dtype" ($c.dtype | default "float16") "defaultTp" 1 "chatTemplate" "" "source" "model.custom" }}
{{- end }}

{{- $sizing := and $v.sizing.enabled $v.gpu.enabled }}
{{- if and $sizing (not $m.catalogName) }}
{{- range $key := list "numAttentionHeads" "numKeyValueHeads" "weightBytes" "kvBytesPerToken" "maxContext" }}
{{- if not (get ($m.custom | default dict) $key) }}
{{- fail (printf "model.custom.%s is required for the GPU sizing check of a model that is not in the catalog (model.catalogName is empty); fill in model.custom, or set sizing.enabled=false to skip the check" $key) }}
{{- end }}
{{- end }}
{{- end }}

{{- /* ---- served name ---- */}}
{{- $modelName := $m.name | default $m.catalogName | default (include "llm-predictor.fullname" .) }}

{{- /* ---- tensor parallel layout ---- */}}
{{- $tp := int ($m.tensorParallelSize | default $facts.defaultTp) }}
{{- $nodes := 1 }}
{{- if $v.multiNode.enabled }}
{{- $nodes = int $v.multiNode.nodes }}
{{- if lt $nodes 2 }}
{{- fail (printf "multiNode.nodes must be at least 2 (got %d); disable multiNode for a single pod" $nodes) }}
{{- end }}
{{- if not $v.gpu.enabled }}
{{- fail "multiNode needs gpu.enabled=true: tensor parallelism across nodes runs over NCCL" }}
{{- end }}
{{- if ne $v.deploymentMode "Standard" }}
{{- fail (printf "multiNode needs deploymentMode Standard (got %s): KServe's Knative mode cannot pin the head pod the workers rendezvous with" $v.deploymentMode) }}
{{- end }}
{{- if or (ne (int $v.minReplicas) 1) (ne (int $v.maxReplicas) 1) (ne $v.autoscaling.class "none") }}
{{- fail (printf "multiNode serves exactly one copy of the model: set minReplicas=1, maxReplicas=1 and autoscaling.class=none (got %d, %d, %s); install a second release for a second copy" (int $v.minReplicas) (int $v.maxReplicas) $v.autoscaling.class) }}
{{- end }}
{{- if ne (mod $tp $nodes) 0 }}
{{- fail (printf "model.tensorParallelSize %d cannot be split evenly over multiNode.nodes=%d: every node runs the same number of GPUs" $tp $nodes) }}
{{- end }}
{{- end }}
{{- $gpusPerPod := div $tp $nodes }}
{{- if and $v.gpu.enabled (gt $gpusPerPod (int $v.gpu.perNode)) }}
{{- if $v.multiNode.enabled }}
{{- fail (printf "each of the %d nodes needs %d GPUs (tensor parallel size %d / %d nodes) but gpu.perNode is %d: raise multiNode.nodes" $nodes $gpusPerPod $tp $nodes (int $v.gpu.perNode)) }}
{{- else }}
{{- fail (printf "tensor parallel size %d needs %d GPUs in one pod but gpu.perNode is %d: use multiNode.enabled=true with multiNode.nodes=%d, or a smaller model.tensorParallelSize if the model fits (see the sizing check)" $tp $tp (int $v.gpu.perNode) (int (ceil (divf $tp $v.gpu.perNode)))) }}
{{- end }}
{{- end }}

{{- /* ---- CPU only: nothing may still steer the pods to GPU nodes (the GPU examples' nodeSelector and
     tolerations), where a pod would hold a GPU node without asking for its GPUs ---- */}}
{{- if not $v.gpu.enabled }}
{{- $domain := printf "%s/" (first (splitList "/" $v.gpu.resourceName)) }}
{{- $gpuScheduling := list }}
{{- range $key, $_ := ($v.nodeSelector | default dict) }}
{{- if hasPrefix $domain $key }}{{ $gpuScheduling = append $gpuScheduling (printf "nodeSelector %s" $key) }}{{ end }}
{{- end }}
{{- range ($v.tolerations | default list) }}
{{- if hasPrefix $domain (.key | default "") }}{{ $gpuScheduling = append $gpuScheduling (printf "toleration %s" .key) }}{{ end }}
{{- end }}
{{- $required := dig "nodeAffinity" "requiredDuringSchedulingIgnoredDuringExecution" "nodeSelectorTerms" list ($v.affinity | default dict) }}
{{- range $required }}
{{- range (.matchExpressions | default list) }}
{{- if hasPrefix $domain .key }}{{ $gpuScheduling = append $gpuScheduling (printf "required node affinity %s" .key) }}{{ end }}
{{- end }}
{{- end }}
{{- with $gpuScheduling }}
{{- fail (printf "gpu.enabled=false runs the model on CPU, but the values still steer the pods to GPU nodes (%s), where they would occupy a GPU node without its GPUs: remove those (e.g. --set nodeSelector=null,tolerations=null; examples/demo-cpu.yaml is a CPU release), or set gpu.enabled=true" (join ", " (uniq .))) }}
{{- end }}
{{- end }}

{{- /* ---- replicas and autoscaling ---- */}}
{{- if lt (int $v.maxReplicas) (int $v.minReplicas) }}
{{- fail (printf "maxReplicas (%d) must be at least minReplicas (%d)" (int $v.maxReplicas) (int $v.minReplicas)) }}
{{- end }}
{{- if and (eq $v.deploymentMode "Knative") (ne $v.autoscaling.class "none") }}
{{- fail (printf "autoscaling.class %s is for deploymentMode Standard; in Knative mode Knative's autoscaler scales between minReplicas and maxReplicas (tune autoscaling.knative.targetConcurrency)" $v.autoscaling.class) }}
{{- end }}
{{- if and (eq $v.deploymentMode "Standard") (eq $v.autoscaling.class "none") (ne (int $v.minReplicas) (int $v.maxReplicas)) }}
{{- fail (printf "autoscaling.class none runs a fixed number of replicas, but minReplicas (%d) and maxReplicas (%d) differ: set both to the same number, or use autoscaling.class hpa or keda" (int $v.minReplicas) (int $v.maxReplicas)) }}
{{- end }}
{{- if and (eq $v.deploymentMode "Standard") (eq (int $v.minReplicas) 0) (ne $v.autoscaling.class "keda") }}
{{- fail "minReplicas 0 (scale to zero) needs deploymentMode Knative or autoscaling.class keda" }}
{{- end }}

{{- /* ---- KV cache per rank: model.kvCacheBytes when set; else the predictor sizes it from model.gpuMemoryUtilization
     at start (on CUDA), and the fit check counts an estimate: kvSequences sequences of maxModelLen tokens ---- */}}
{{- $maxContext := float64 ($facts.maxContext | default 0) }}
{{- $maxModelLen := float64 ($m.maxModelLen | default $maxContext) }}
{{- if and $maxContext (gt $maxModelLen $maxContext) }}
{{- fail (printf "model.maxModelLen %d is longer than the %d-token context of %s" (int $maxModelLen) (int $maxContext) $modelName) }}
{{- end }}
{{- /* weights and KV scale with the serving dtype against the dtype the facts are counted in */}}
{{- $factor := 1.0 }}
{{- if and (ne $m.dtype "auto") (float64 (include "llm-predictor.dtypeBytes" $facts.dtype)) }}
{{- $factor = divf (include "llm-predictor.dtypeBytes" $m.dtype) (include "llm-predictor.dtypeBytes" $facts.dtype) }}
{{- end }}
{{- $weightBytes := mulf (float64 ($facts.weightBytes | default 0)) $factor }}
{{- $kvPerToken := float64 (include "llm-predictor.kvBytesPerTokenPerRank" (dict "facts" $facts "tp" $tp "dtype" $m.dtype)) }}
{{- $kvPerRank := 0.0 }}
{{- $kvDesc := "" }}
{{- $kvSource := "kvCacheBytes" }}
{{- if $m.kvCacheBytes }}
{{- $kvPerRank = float64 $m.kvCacheBytes }}
{{- $kvDesc = "model.kvCacheBytes per GPU" }}
{{- else }}
{{- $kvSource = ternary "gpuMemoryUtilization" "predictor default" (and $v.gpu.enabled true) }}
{{- if and $kvPerToken $maxModelLen }}
{{- $kvPerRank = mulf $kvPerToken $maxModelLen (float64 $v.sizing.kvSequences) }}
{{- $kvDesc = printf "%d sequences x %d tokens over %d GPUs" (int $v.sizing.kvSequences) (int $maxModelLen) $tp }}
{{- end }}
{{- end }}
{{- $gpuBytes := mulf (float64 $v.gpu.memoryGiB) $GiB }}
{{- /* the most the predictor can give the KV cache with gpuMemoryUtilization: its share of the GPU less the weights */}}
{{- $kvBudget := 0.0 }}
{{- if eq $kvSource "gpuMemoryUtilization" }}
{{- $kvBudget = subf (mulf (float64 $m.gpuMemoryUtilization) $gpuBytes) (divf $weightBytes $tp) }}
{{- end }}

{{- /* ---- sizing check ---- */}}
{{- $perGpu := 0.0 }}
{{- if $sizing }}
{{- $heads := int $facts.heads }}
{{- $kvHeads := int $facts.kvHeads }}
{{- $valid := list }}
{{- range $i := until 65 }}
{{- if and (gt $i 0) (eq (mod $heads $i) 0) (eq (mod $kvHeads $i) 0) }}
{{- $valid = append $valid (toString $i) }}
{{- end }}
{{- end }}
{{- if or (ne (mod $heads $tp) 0) (ne (mod $kvHeads $tp) 0) }}
{{- fail (printf "tensor parallel size %d does not divide the %d attention heads and %d KV heads of %s (%s); valid tensor parallel sizes: %s" $tp $heads $kvHeads $modelName $facts.source (join ", " $valid)) }}
{{- end }}
{{- $perGpu = mulf (addf 1.0 $v.sizing.overheadFraction) (addf (divf $weightBytes $tp) $kvPerRank) }}
{{- if gt $perGpu $gpuBytes }}
{{- fail (printf "%s does not fit: each of the %d GPUs needs %.1f GiB (weights %.1f GiB / %d GPUs + KV cache %.1f GiB for %s, plus %.0f%% overhead) but gpu.memoryGiB is %v. Raise model.tensorParallelSize (valid: %s), lower model.maxModelLen, sizing.kvSequences or model.kvCacheBytes, or use GPUs with more memory." $modelName $tp (divf $perGpu $GiB) (divf $weightBytes $GiB) $tp (divf $kvPerRank $GiB) $kvDesc (mulf $v.sizing.overheadFraction 100.0) $v.gpu.memoryGiB (join ", " $valid)) }}
{{- end }}
{{- $oneSequence := mulf $kvPerToken $maxModelLen }}
{{- if and (eq $kvSource "gpuMemoryUtilization") (lt $kvBudget $oneSequence) }}
{{- fail (printf "%s does not fit in model.gpuMemoryUtilization %v of a %v GiB GPU: that leaves %.1f GiB for its share of the weights (%.1f GiB / %d GPUs = %.1f GiB) and a KV cache of at least one sequence of %d tokens (%.2f GiB), so the predictor could not start. Raise model.gpuMemoryUtilization or model.tensorParallelSize, lower model.maxModelLen, or set model.kvCacheBytes." $modelName $m.gpuMemoryUtilization $v.gpu.memoryGiB (divf (mulf (float64 $m.gpuMemoryUtilization) $gpuBytes) $GiB) (divf $weightBytes $GiB) $tp (divf $weightBytes $tp $GiB) (int $maxModelLen) (divf $oneSequence $GiB)) }}
{{- end }}
{{- end }}

{{- /* ---- startup allowance, sized for the weights one pod loads ---- */}}
{{- $startupFailures := int $v.probes.startup.failureThreshold }}
{{- if eq $startupFailures 0 }}
{{- $load := divf (divf $weightBytes $nodes) (float64 $v.probes.startup.loadBytesPerSecond) }}
{{- if eq $m.verifyWeights "full" }}
{{- $load = mulf $load 2.0 }}
{{- end }}
{{- $seconds := addf (float64 $v.probes.startup.baseSeconds) $load }}
{{- $startupFailures = int (ceil (divf $seconds (float64 $v.probes.startup.periodSeconds))) }}
{{- end }}

{{- dict "modelName" $modelName "tp" $tp "nodes" $nodes "gpusPerPod" (ternary $gpusPerPod 0 $v.gpu.enabled) "chatTemplate" ($m.chatTemplate | default $facts.chatTemplate) "weightBytes" $weightBytes "kvBytesPerTokenPerRank" $kvPerToken "kvCacheBytesPerRank" $kvPerRank "kvSource" $kvSource "kvBudgetBytesPerRank" $kvBudget "perGpuBytes" $perGpu "startupFailureThreshold" $startupFailures | toJson }}
{{- end }}
