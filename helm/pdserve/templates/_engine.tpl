{{/* The Deployment of an engine pool (prefill or decode):
     include "pdserve.engineDeployment" (dict "root" $ "role" "prefill" "pool" .Values.prefill) */}}
{{- define "pdserve.engineDeployment" -}}
{{- $root := .root -}}
{{- $pool := .pool -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "pdserve.fullname" $root }}-{{ .role }}
  labels:
    {{- include "pdserve.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .role }}
spec:
  {{- if not $pool.autoscaling.enabled }}
  replicas: {{ $pool.replicas }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "pdserve.selector" (dict "root" $root "component" .role) | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "pdserve.labels" $root | nindent 8 }}
        app.kubernetes.io/component: {{ .role }}
    spec:
      {{- include "pdserve.podCommon" $root | nindent 6 }}
      # a node drains its running requests on SIGTERM before it stops
      terminationGracePeriodSeconds: 60
      containers:
        - name: {{ .role }}
          image: {{ include "pdserve.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          args: [{{ .role | quote }}, "--log-level", {{ $root.Values.logLevel | quote }}]
          env:
            {{- include "pdserve.envCommon" $root | nindent 12 }}
            {{- range $key := list "PDSERVE_MODEL" "PDSERVE_REDIS_URL" "PDSERVE_HOST" "PDSERVE_HEARTBEAT_INTERVAL_S" "PDSERVE_HEARTBEAT_TTL_S" }}
            - name: {{ $key }}
              valueFrom:
                configMapKeyRef:
                  name: {{ include "pdserve.fullname" $root }}
                  key: {{ $key }}
            {{- end }}
            - name: POD_IP
              valueFrom:
                fieldRef:
                  fieldPath: status.podIP
            # routers dial the pod itself: its address is what it registers in Redis
            - name: PDSERVE_ADVERTISE_HOST
              value: $(POD_IP)
            - name: PDSERVE_PORT
              value: {{ $pool.port | quote }}
            - name: PDSERVE_METRICS_PORT
              value: {{ $pool.metricsPort | quote }}
            - name: PDSERVE_DEVICE
              value: {{ ternary "cuda" "cpu" $pool.gpu | quote }}
            {{- if eq .role "decode" }}
            - name: PDSERVE_KV_HOST
              value: "0.0.0.0"
            - name: PDSERVE_KV_PORT
              value: {{ $pool.kvPort | quote }}
            - name: PDSERVE_KV_ADVERTISE_HOST
              value: $(POD_IP)
            - name: PDSERVE_RESERVATION_TIMEOUT_S
              value: {{ $pool.reservationTimeoutSeconds | quote }}
            - name: PDSERVE_KV_CONNECTOR
              value: {{ $root.Values.kvConnector | quote }}
            {{- end }}
            {{- range $key, $value := $pool.extraEnv }}
            - name: {{ $key }}
              value: {{ $value | quote }}
            {{- end }}
          ports:
            - {name: grpc, containerPort: {{ $pool.port }}}
            - {name: metrics, containerPort: {{ $pool.metricsPort }}}
            {{- if eq .role "decode" }}
            - {name: kv, containerPort: {{ $pool.kvPort }}}
            {{- end }}
          # health is NOT_SERVING while the model loads and while the node drains
          startupProbe:
            {{- include "pdserve.grpcCheck" (dict "root" $root "port" $pool.port) | nindent 12 }}
            periodSeconds: 5
            failureThreshold: 120
          readinessProbe:
            {{- include "pdserve.grpcCheck" (dict "root" $root "port" $pool.port) | nindent 12 }}
            periodSeconds: 5
          livenessProbe:
            tcpSocket: {port: {{ $pool.port }}}
            periodSeconds: 10
            failureThreshold: 6
          resources:
            {{- include "pdserve.engineResources" $pool | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            {{- include "pdserve.engineMounts" $root | nindent 12 }}
      volumes:
        {{- include "pdserve.engineVolumes" (dict "root" $root "pool" $pool) | nindent 8 }}
      {{- with $pool.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $pool.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end -}}

{{/* A HorizontalPodAutoscaler: (dict "root" $ "component" "router" "autoscaling" ...) */}}
{{- define "pdserve.hpa" -}}
{{- if .autoscaling.enabled }}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "pdserve.fullname" .root }}-{{ .component }}
  labels:
    {{- include "pdserve.labels" .root | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "pdserve.fullname" .root }}-{{ .component }}
  minReplicas: {{ .autoscaling.minReplicas }}
  maxReplicas: {{ .autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ .autoscaling.targetCPUUtilizationPercentage }}
{{- end }}
{{- end -}}

{{/* A PodDisruptionBudget: (dict "root" $ "component" "router") */}}
{{- define "pdserve.pdb" -}}
{{- if .root.Values.podDisruptionBudget.enabled }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "pdserve.fullname" .root }}-{{ .component }}
  labels:
    {{- include "pdserve.labels" .root | nindent 4 }}
spec:
  maxUnavailable: {{ .root.Values.podDisruptionBudget.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "pdserve.selector" . | nindent 6 }}
{{- end }}
{{- end -}}
