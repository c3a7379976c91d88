{{- /*
Helpers of the llm-predictor chart. Each takes the root context (.) unless its comment says otherwise;
helpers that need the deployment plan take a dict with "plan" (the plan, see llm-predictor.plan in
_sizing.tpl) and "context" (the root context), in the style of bitnami's common chart.
*/ -}}

{{/*
llm-predictor.name: the chart name, or nameOverride; at most 63 characters.
*/}}
{{- define "llm-predictor.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
llm-predictor.fullname: the fully qualified app name, also the InferenceService name: fullnameOverride,
else the release name plus the chart name (unless the release name contains it). KServe appends
"-predictor" (and "-predictor-<hash>" for pods), so it is truncated to 45 characters to keep derived
names valid.
*/}}
{{- define "llm-predictor.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 45 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
llm-predictor.chart: "<chart name>-<chart version>", the value of the helm.sh/chart label.
*/}}
{{- define "llm-predictor.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
llm-predictor.selectorLabels: the labels that select this release's pods (YAML lines).
*/}}
{{- define "llm-predictor.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-predictor.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
llm-predictor.labels: the labels of every object: chart, selector, version and managed-by labels,
plus the values' labels (YAML lines).
*/}}
{{- define "llm-predictor.labels" -}}
helm.sh/chart: {{ include "llm-predictor.chart" . }}
{{ include "llm-predictor.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.labels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
llm-predictor.predictorName: "<fullname>-predictor", the name KServe gives the predictor component
(Deployment and Service in Standard mode, Knative Service in Knative mode).
*/}}
{{- define "llm-predictor.predictorName" -}}
{{- printf "%s-predictor" (include "llm-predictor.fullname" .) }}
{{- end }}

{{/*
llm-predictor.httpPort: the port the predictor serves HTTP on: its --http_port, the container port,
the probes' port and the Prometheus scrape port. 8080 is KServe's port for a custom predictor.
*/}}
{{- define "llm-predictor.httpPort" -}}
8080
{{- end }}

{{/*
llm-predictor.image: the model image reference: repository@digest, repository:tag, or
repository:appVersion. Fails when image.repository is empty.
*/}}
{{- define "llm-predictor.image" -}}
{{- $repo := required "image.repository is required: the model image built with `make image`, e.g. --set image.repository=registry.example.com/llm/llama-2-7b-chat" .Values.image.repository }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repo .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
llm-predictor.serviceAccountName: the ServiceAccount the pods run as: serviceAccount.name, else the
full name when the chart creates it, else "default".
*/}}
{{- define "llm-predictor.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llm-predictor.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
llm-predictor.createPullSecret: "true" when the chart creates a dockerconfigjson Secret (registry
credentials or pullSecret.dockerConfigJson), else empty. Fails on contradictory pullSecret values.
*/}}
{{- define "llm-predictor.createPullSecret" -}}
{{- $p := .Values.pullSecret }}
{{- if and $p.dockerConfigJson (or $p.server $p.username $p.password) }}
{{- fail "pullSecret: give either registry credentials (server, username, password) or dockerConfigJson, not both" }}
{{- end }}
{{- if or $p.server $p.username $p.password }}
{{- if not (and $p.server $p.username $p.password) }}
{{- fail "pullSecret: registry credentials need all of pullSecret.server, pullSecret.username and pullSecret.password" }}
{{- end }}
{{- if or (contains "://" $p.server) (contains "/" $p.server) }}
{{- fail (printf "pullSecret.server must be a registry host such as registry.example.com, without scheme or path (got %q)" $p.server) }}
{{- end }}
{{- "true" }}
{{- else if $p.dockerConfigJson }}
{{- "true" }}
{{- end }}
{{- end }}

{{/*
llm-predictor.pullSecretName: the name of the chart-created pull Secret.
*/}}
{{- define "llm-predictor.pullSecretName" -}}
{{- default (printf "%s-pull-secret" (include "llm-predictor.fullname" .)) .Values.pullSecret.name }}
{{- end }}

{{/*
llm-predictor.imagePullSecrets: the imagePullSecrets list (YAML "- name: ..." lines): the existing
Secrets, then the chart-created one; empty when there is none. Fails when pullSecret.existing is a string
(`--set pullSecret.existing=regcred`, which the schema lets through for this message) or names an empty Secret.
*/}}
{{- define "llm-predictor.imagePullSecrets" -}}
{{- $existing := .Values.pullSecret.existing | default list }}
{{- if kindIs "string" $existing }}
{{- fail (printf "pullSecret.existing is a list of Secret names, not the string %q: --set 'pullSecret.existing={%s}' (braces make a list, commas separate names; quote it for the shell), or existing: [%s] under pullSecret in a values file" $existing $existing $existing) }}
{{- end }}
{{- $names := list }}
{{- range $i, $name := $existing }}
{{- if not (trim $name) }}
{{- fail (printf "pullSecret.existing[%d] is empty (got %s): each entry names an image pull Secret in the release namespace, e.g. --set 'pullSecret.existing={regcred}'" $i (toJson $existing)) }}
{{- end }}
{{- $names = append $names $name }}
{{- end }}
{{- if include "llm-predictor.createPullSecret" . }}
{{- $names = append $names (include "llm-predictor.pullSecretName" .) }}
{{- end }}
{{- range $names | uniq }}
- name: {{ . }}
{{- end }}
{{- end }}

{{/*
llm-predictor.dockerConfigJson: the .dockerconfigjson document (JSON text) of the chart-created pull
Secret. Fails when pullSecret.dockerConfigJson is not a JSON document with "auths".
*/}}
{{- define "llm-predictor.dockerConfigJson" -}}
{{- $p := .Values.pullSecret }}
{{- if $p.dockerConfigJson }}
{{- $doc := $p.dockerConfigJson | fromJson }}
{{- if or (hasKey $doc "Error") (not (hasKey $doc "auths")) }}
{{- fail "pullSecret.dockerConfigJson must be a JSON document with an \"auths\" object, e.g. {\"auths\":{\"registry.example.com\":{\"auth\":\"<base64 user:password>\"}}}" }}
{{- end }}
{{- $p.dockerConfigJson }}
{{- else }}
{{- $entry := dict "username" $p.username "password" $p.password "auth" (printf "%s:%s" $p.username $p.password | b64enc) }}
{{- if $p.email }}
{{- $_ := set $entry "email" $p.email }}
{{- end }}
{{- dict "auths" (dict $p.server $entry) | toJson }}
{{- end }}
{{- end }}

{{/*
llm-predictor.apiKeySecretName: the name of the Secret holding the API key (apiKey.existingSecret, or
the chart-created <fullname>-api-key); empty when there is no API key.
*/}}
{{- define "llm-predictor.apiKeySecretName" -}}
{{- if .Values.apiKey.existingSecret }}
{{- .Values.apiKey.existingSecret }}
{{- else if .Values.apiKey.value }}
{{- printf "%s-api-key" (include "llm-predictor.fullname" .) }}
{{- end }}
{{- end }}

{{/*
llm-predictor.volumes: the pod volumes shared by the head and the workers (YAML list): the root
filesystem is read-only, so writable emptyDirs for /tmp and HOME, and a memory-backed /dev/shm for NCCL.
*/}}
{{- define "llm-predictor.volumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shm.sizeLimit | quote }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmp.sizeLimit | quote }}
- name: home
  emptyDir:
    sizeLimit: {{ .Values.home.sizeLimit | quote }}
{{- end }}

{{/*
llm-predictor.volumeMounts: the container's mounts of llm-predictor.volumes (YAML list).
*/}}
{{- define "llm-predictor.volumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: {{ .Values.home.path }}
{{- end }}

{{/*
llm-predictor.env: the container environment shared by the head and the workers (YAML list): HOME, the
API key from its Secret, then the values' env.
*/}}
{{- define "llm-predictor.env" -}}
- name: HOME
  value: {{ .Values.home.path | quote }}
{{- with (include "llm-predictor.apiKeySecretName" .) }}
- name: PREDICTOR_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.apiKey.secretKey }}
{{- end }}
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
llm-predictor.resources: the resources of one pod (YAML): the values' requests and limits plus the
plan's gpusPerPod GPUs in both. Quantities are rendered as strings, as Kubernetes' API types them.
Takes (dict "plan" $plan "context" $).
*/}}
{{- define "llm-predictor.resources" -}}
{{- $plan := .plan }}
{{- $v := .context.Values }}
{{- $requests := dict }}
{{- $limits := dict }}
{{- range $k, $q := ($v.resources.requests | default dict) }}
{{- $_ := set $requests $k (toString $q) }}
{{- end }}
{{- range $k, $q := ($v.resources.limits | default dict) }}
{{- $_ := set $limits $k (toString $q) }}
{{- end }}
{{- if $v.gpu.enabled }}
{{- $_ := set $requests $v.gpu.resourceName (toString (int $plan.gpusPerPod)) }}
{{- $_ := set $limits $v.gpu.resourceName (toString (int $plan.gpusPerPod)) }}
{{- end }}
{{- $out := dict }}
{{- if $requests }}{{ $_ := set $out "requests" $requests }}{{ end }}
{{- if $limits }}{{ $_ := set $out "limits" $limits }}{{ end }}
{{- toYaml $out }}
{{- end }}

{{/*
llm-predictor.scheduling: the pod's scheduling fields shared by the head and the workers (YAML):
nodeSelector, tolerations, affinity, priorityClassName, each only when set.
*/}}
{{- define "llm-predictor.scheduling" -}}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end }}

{{/*
llm-predictor.predictorArgs: the predictor's flags (KServe style --flag=value, YAML list) shared by
the single-pod and multi-node forms. Takes (dict "plan" $plan "context" $).
*/}}
{{- define "llm-predictor.predictorArgs" -}}
{{- $plan := .plan }}
{{- $m := .context.Values.model -}}
- --model_name={{ $plan.modelName }}
- --model_dir={{ $m.dir }}
- --http_port={{ include "llm-predictor.httpPort" .context }}
- --dtype={{ $m.dtype }}
- --device={{ $m.device }}
- --tensor_parallel_size={{ int $plan.tp }}
{{- if $m.maxModelLen }}
- --max_model_len={{ int $m.maxModelLen }}
{{- end }}
{{- if $m.maxNumSeqs }}
- --max_num_seqs={{ int $m.maxNumSeqs }}
{{- end }}
{{- if $m.maxQueue }}
- --max_queue={{ int $m.maxQueue }}
{{- end }}
{{- if .context.Values.gpu.enabled }}
- --gpu_memory_utilization={{ $m.gpuMemoryUtilization }}
{{- end }}
{{- if $m.kvCacheBytes }}
- --kv_cache_bytes={{ $m.kvCacheBytes | int64 }}
{{- end }}
{{- if $m.enforceEager }}
- --enforce_eager
{{- end }}
{{- if $m.asyncScheduling }}
{{- if gt (int $plan.tp) 1 }}
{{- fail (printf "model.asyncScheduling needs a tensor parallel size of 1 (got %d): the other ranks would need the tokens that only the first one samples" (int $plan.tp)) }}
{{- end }}
- --async_scheduling
{{- end }}
{{- with $plan.chatTemplate }}
- --chat_template={{ . }}
{{- end }}
- --verify_weights={{ $m.verifyWeights }}
- --shutdown_timeout={{ include "llm-predictor.shutdownTimeout" .context }}
{{- range $m.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/*
llm-predictor.probe: an HTTP probe (YAML) on the model's readiness route, /v1/models/<name>, which
answers 503 while the weights load and 200 once the model is ready. Takes (dict "probe" <one of
.Values.probes> "failureThreshold" <int> "plan" $plan "context" $).
*/}}
{{- define "llm-predictor.probe" -}}
{{- $p := .probe -}}
httpGet:
  path: /v1/models/{{ .plan.modelName }}
  port: {{ include "llm-predictor.httpPort" .context }}
periodSeconds: {{ int $p.periodSeconds }}
timeoutSeconds: {{ int $p.timeoutSeconds }}
failureThreshold: {{ int .failureThreshold }}
{{- end }}

{{/*
llm-predictor.headService: multi-node: the name of the head's headless Service, which the
rendezvous goes through.
*/}}
{{- define "llm-predictor.headService" -}}
{{- printf "%s-head" (include "llm-predictor.fullname" .) }}
{{- end }}

{{/*
llm-predictor.workerName: multi-node: the name of the workers' StatefulSet and headless Service.
*/}}
{{- define "llm-predictor.workerName" -}}
{{- printf "%s-worker" (include "llm-predictor.fullname" .) }}
{{- end }}

{{/*
llm-predictor.torchrunArgs: multi-node: torchrun's options after the node rank, then the predictor
module (YAML list). Static rendezvous on the head (node rank 0, which also serves HTTP); workers take
their node rank from PET_NODE_RANK. Takes (dict "plan" $plan "context" $).
*/}}
{{- define "llm-predictor.torchrunArgs" -}}
{{- $plan := .plan }}
{{- $ctx := .context -}}
- --nnodes={{ int $plan.nodes }}
- --nproc_per_node={{ int $plan.gpusPerPod }}
- --rdzv_backend=static
- --rdzv_endpoint={{ include "llm-predictor.headService" $ctx }}.{{ $ctx.Release.Namespace }}.svc:{{ int $ctx.Values.multiNode.rendezvousPort }}
- --rdzv_conf=timeout={{ int $ctx.Values.multiNode.rendezvousTimeoutSeconds }}
- --max_restarts=0
- --shutdown_timeout={{ max 1 (sub (int $ctx.Values.terminationGracePeriodSeconds) 5) }}
- -m
- predictor
{{- end }}

{{/*
llm-predictor.shutdownTimeout: the predictor's --shutdown_timeout, the seconds running requests get to finish
once the pod is stopped: terminationGracePeriodSeconds less 15 for ending the rest, sending their last bytes and
exiting (at least 1). torchrun (multi-node) waits terminationGracePeriodSeconds less 5 for its ranks: rank 0
drains, then stops the others.
*/}}
{{- define "llm-predictor.shutdownTimeout" -}}
{{- max 1 (sub (int .Values.terminationGracePeriodSeconds) 15) -}}
{{- end }}
