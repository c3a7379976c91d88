{{/*
Expand the name of the chart.
*/}}
{{- define "llm-predictor.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name, also the InferenceService name. KServe appends "-predictor" (and
"-predictor-<hash>" for pods), so it is truncated to 45 characters to keep derived names valid.
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
Chart name and version as used by the chart label.
*/}}
{{- define "llm-predictor.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels.
*/}}
{{- define "llm-predictor.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-predictor.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Common labels.
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
Name of the KServe predictor component (Deployment / Service / Knative Service).
*/}}
{{- define "llm-predictor.predictorName" -}}
{{- printf "%s-predictor" (include "llm-predictor.fullname" .) }}
{{- end }}

{{/*
Model image reference: repository@digest, repository:tag, or repository:appVersion.
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
Name of the ServiceAccount the pods run as.
*/}}
{{- define "llm-predictor.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llm-predictor.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Whether the chart creates a dockerconfigjson Secret, and its name.
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

{{- define "llm-predictor.pullSecretName" -}}
{{- default (printf "%s-pull-secret" (include "llm-predictor.fullname" .)) .Values.pullSecret.name }}
{{- end }}

{{/*
imagePullSecrets list (YAML), empty when there is none.
*/}}
{{- define "llm-predictor.imagePullSecrets" -}}
{{- $names := list }}
{{- range .Values.pullSecret.existing }}
{{- $names = append $names . }}
{{- end }}
{{- if include "llm-predictor.createPullSecret" . }}
{{- $names = append $names (include "llm-predictor.pullSecretName" .) }}
{{- end }}
{{- range $names | uniq }}
- name: {{ . }}
{{- end }}
{{- end }}

{{/*
The .dockerconfigjson document of the chart-created pull Secret.
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
Name of the Secret holding the API key and whether there is one.
*/}}
{{- define "llm-predictor.apiKeySecretName" -}}
{{- if .Values.apiKey.existingSecret }}
{{- .Values.apiKey.existingSecret }}
{{- else if .Values.apiKey.value }}
{{- printf "%s-api-key" (include "llm-predictor.fullname" .) }}
{{- end }}
{{- end }}

{{/*
Volumes and mounts shared by the head and the workers: read-only root filesystem plus writable
emptyDirs for /tmp and HOME, and a memory-backed /dev/shm for NCCL.
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

{{- define "llm-predictor.volumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: {{ .Values.home.path }}
{{- end }}

{{/*
Environment shared by the head and the workers.
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
Resources of one pod: the values' cpu/memory plus gpusPerPod GPUs in requests and limits.
Quantities are rendered as strings, as Kubernetes' API types them.
*/}}
{{- define "llm-predictor.resources" -}}
{{- $plan := include "llm-predictor.plan" . | fromJson }}
{{- $requests := dict }}
{{- $limits := dict }}
{{- range $k, $v := (.Values.resources.requests | default dict) }}
{{- $_ := set $requests $k (toString $v) }}
{{- end }}
{{- range $k, $v := (.Values.resources.limits | default dict) }}
{{- $_ := set $limits $k (toString $v) }}
{{- end }}
{{- if .Values.gpu.enabled }}
{{- $_ := set $requests .Values.gpu.resourceName (toString (int $plan.gpusPerPod)) }}
{{- $_ := set $limits .Values.gpu.resourceName (toString (int $plan.gpusPerPod)) }}
{{- end }}
{{- $out := dict }}
{{- if $requests }}{{ $_ := set $out "requests" $requests }}{{ end }}
{{- if $limits }}{{ $_ := set $out "limits" $limits }}{{ end }}
{{- toYaml $out }}
{{- end }}

{{/*
Pod scheduling fields shared by the head and the workers.
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
Predictor flags (KServe style --flag=value) shared by the single-pod and multi-node forms.
*/}}
{{- define "llm-predictor.predictorArgs" -}}
{{- $plan := include "llm-predictor.plan" . | fromJson }}
{{- $m := .Values.model -}}
- --model_name={{ $plan.modelName }}
- --model_dir={{ $m.dir }}
- --http_port=8080
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
{{- if gt $plan.kvCacheBytesPerRank 0.0 }}
- --kv_cache_bytes={{ $plan.kvCacheBytesPerRank | int64 }}
{{- end }}
{{- with $plan.chatTemplate }}
- --chat_template={{ . }}
{{- end }}
- --verify_weights={{ $m.verifyWeights }}
{{- range $m.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/*
An HTTP probe on the model's readiness route.
*/}}
{{- define "llm-predictor.probe" -}}
{{- $root := index . 0 }}
{{- $p := index . 1 }}
{{- $failureThreshold := index . 2 }}
{{- $plan := include "llm-predictor.plan" $root | fromJson -}}
httpGet:
  path: /v1/models/{{ $plan.modelName }}
  port: 8080
periodSeconds: {{ int $p.periodSeconds }}
timeoutSeconds: {{ int $p.timeoutSeconds }}
failureThreshold: {{ int $failureThreshold }}
{{- end }}

{{/*
Multi-node: DNS name of the head's headless Service, which the rendezvous goes through.
*/}}
{{- define "llm-predictor.headService" -}}
{{- printf "%s-head" (include "llm-predictor.fullname" .) }}
{{- end }}

{{- define "llm-predictor.workerName" -}}
{{- printf "%s-worker" (include "llm-predictor.fullname" .) }}
{{- end }}

{{/*
Multi-node: torchrun options after the node rank, then the predictor module. Static rendezvous on
the head (node rank 0, which also serves HTTP); workers take their node rank from PET_NODE_RANK.
*/}}
{{- define "llm-predictor.torchrunArgs" -}}
{{- $plan := include "llm-predictor.plan" . | fromJson -}}
- --nnodes={{ int $plan.nodes }}
- --nproc_per_node={{ int $plan.gpusPerPod }}
- --rdzv_backend=static
- --rdzv_endpoint={{ include "llm-predictor.headService" . }}.{{ .Release.Namespace }}.svc:{{ int .Values.multiNode.rendezvousPort }}
- --rdzv_conf=timeout={{ int .Values.multiNode.rendezvousTimeoutSeconds }}
- --max_restarts=0
- -m
- predictor
{{- end }}
