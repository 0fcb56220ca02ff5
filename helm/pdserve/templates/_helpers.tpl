{{/* The release's base name, cut to fit Kubernetes' 63 characters with a component suffix. */}}
{{- define "pdserve.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "pdserve.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: include with (dict "root" $ "component" "router") */}}
{{- define "pdserve.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "pdserve.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "pdserve.redisUrl" -}}
{{- if .Values.redis.enabled -}}
redis://{{ include "pdserve.fullname" . }}-redis:{{ .Values.redis.port }}/0
{{- else -}}
{{ .Values.redis.externalUrl }}
{{- end -}}
{{- end -}}

{{/* The pod spec parts every pdserve pod shares. */}}
{{- define "pdserve.podCommon" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Environment of every pdserve container: where things are written, the cluster secret. */}}
{{- define "pdserve.envCommon" -}}
- name: PDSERVE_CLUSTER_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ .Values.clusterSecret.existingSecret | default (printf "%s-cluster" (include "pdserve.fullname" .)) }}
      key: cluster-secret
{{- with .Values.tls.existingSecret }}
- name: PDSERVE_TLS_CERT
  value: /etc/pdserve/tls/tls.crt
- name: PDSERVE_TLS_KEY
  value: /etc/pdserve/tls/tls.key
- name: PDSERVE_TLS_CA
  value: /etc/pdserve/tls/ca.crt
- name: PDSERVE_TLS_SERVER_NAME
  value: {{ $.Values.tls.serverName | quote }}
- name: PDSERVE_TLS_KV
  value: {{ ternary "on" "off" $.Values.tls.kv | quote }}
{{- end }}
{{- with .Values.tracing.otlpEndpoint }}
- name: PDSERVE_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
- name: HOME
  value: /tmp
- name: TRITON_CACHE_DIR
  value: /tmp/triton
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
{{- end -}}

{{/* The TLS Secret's volume and mount (nothing without tls.existingSecret). */}}
{{- define "pdserve.tlsVolume" -}}
{{- with .Values.tls.existingSecret }}
- name: tls
  secret:
    secretName: {{ . }}
{{- end }}
{{- end -}}

{{- define "pdserve.tlsMount" -}}
{{- if .Values.tls.existingSecret }}
- {name: tls, mountPath: /etc/pdserve/tls, readOnly: true}
{{- end }}
{{- end -}}

{{/* A gRPC readiness or startup check: Kubernetes' own gRPC probe speaks no TLS, so with TLS
     the probe is `pdserve health` in the container (include with (dict "root" $ "port" 50051)). */}}
{{- define "pdserve.grpcCheck" -}}
{{- if .root.Values.tls.existingSecret }}
exec:
  command: ["pdserve", "health", "127.0.0.1:{{ .port }}"]
timeoutSeconds: 5
{{- else }}
grpc: {port: {{ .port }}}
{{- end }}
{{- end -}}

{{/* Volumes of an engine pod (prefill, decode): scratch, shared memory, the model. */}}
{{- define "pdserve.engineVolumes" -}}
- name: tmp
  emptyDir: {}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .pool.shmSize }}
{{- with .root.Values.model.volume }}
- name: model
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- include "pdserve.tlsVolume" .root }}
{{- end -}}

{{- define "pdserve.engineMounts" -}}
- name: tmp
  mountPath: /tmp
- name: shm
  mountPath: /dev/shm
{{- if .Values.model.volume }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- include "pdserve.tlsMount" . }}
{{- end -}}

{{/* Resources of an engine container, with nvidia.com/gpu when the pool asks for GPUs. */}}
{{- define "pdserve.engineResources" -}}
{{- $res := deepCopy .resources -}}
{{- if .gpu -}}
{{- $limits := $res.limits | default dict -}}
{{- $_ := set $limits "nvidia.com/gpu" .gpuCount -}}
{{- $_ := set $res "limits" $limits -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}
