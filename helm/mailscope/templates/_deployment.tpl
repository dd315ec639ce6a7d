{{/*
One Deployment of `mailscope serve` (api or worker): the same image and settings, different
arguments, replicas, resources and database pool.
Call with (dict "ctx" $ "component" "api" "args" (list "serve" "--no-worker")).
*/}}
{{- define "mailscope.deployment" -}}
{{- $ctx := .ctx -}}
{{- $v := index $ctx.Values .component -}}
{{- $args := .args -}}
{{- if $ctx.Values.migrations.enabled }}
{{- /* The hook Job has already applied the migrations; pods never race a schema change. */}}
{{- $args = append $args "--no-migrate" }}
{{- end }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "mailscope.fullname" $ctx }}-{{ .component }}
  labels:
    {{- include "mailscope.componentLabels" . | nindent 4 }}
spec:
  {{- if not $v.autoscaling.enabled }}
  replicas: {{ $v.replicas }}
  {{- end }}
  revisionHistoryLimit: {{ $ctx.Values.revisionHistoryLimit }}
  selector:
    matchLabels:
      {{- include "mailscope.selectorLabels" . | nindent 6 }}
  strategy:
    {{- toYaml $v.strategy | nindent 4 }}
  template:
    metadata:
      labels:
        {{- include "mailscope.componentLabels" . | nindent 8 }}
        {{- with $ctx.Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        {{- /* A changed setting rolls the pods: env from a ConfigMap is read only at start. */}}
        checksum/config: {{ include (print $ctx.Template.BasePath "/configmap.yaml") $ctx | sha256sum }}
        {{- if $ctx.Values.secrets.create }}
        checksum/secret: {{ include (print $ctx.Template.BasePath "/secret-demo.yaml") $ctx | sha256sum }}
        {{- end }}
        {{- with $ctx.Values.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- with $v.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "mailscope.serviceAccountName" $ctx }}
      automountServiceAccountToken: false
      {{- /* Service links would inject MAILSCOPE_*_SERVICE_HOST variables, which the strict config rejects. */}}
      enableServiceLinks: false
      {{- with $ctx.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $ctx.Values.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      securityContext:
        {{- toYaml $ctx.Values.podSecurityContext | nindent 8 }}
      terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
      containers:
        - name: {{ .component }}
          image: {{ include "mailscope.image" $ctx | quote }}
          imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
          args:
            {{- toYaml $args | nindent 12 }}
          ports:
            - name: http
              containerPort: {{ include "mailscope.httpPort" $ctx }}
              protocol: TCP
          envFrom:
            - configMapRef:
                name: {{ include "mailscope.fullname" $ctx }}
          env:
            {{- include "mailscope.secretEnv" (dict "ctx" $ctx "secretName" (include "mailscope.secretName" $ctx)) | nindent 12 }}
            - name: MAILSCOPE_DATABASE__POOL_SIZE
              value: {{ $v.databasePoolSize | quote }}
            {{- if eq .component "worker" }}
            - name: MAILSCOPE_WORKER__CONCURRENCY
              value: {{ $v.concurrency | quote }}
            {{- end }}
            {{- with $v.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          startupProbe:
            httpGet:
              path: /healthz
              port: http
            {{- toYaml $v.startupProbe | nindent 12 }}
          livenessProbe:
            httpGet:
              path: /healthz
              port: http
            {{- toYaml $v.livenessProbe | nindent 12 }}
          readinessProbe:
            httpGet:
              path: /readyz
              port: http
            {{- toYaml $v.readinessProbe | nindent 12 }}
          {{- if gt (int $v.preStopSleepSeconds) 0 }}
          lifecycle:
            {{- /* Keep serving while endpoints and load balancers stop routing here; no shell needed. */}}
            preStop:
              sleep:
                seconds: {{ $v.preStopSleepSeconds }}
          {{- end }}
          resources:
            {{- toYaml $v.resources | nindent 12 }}
          securityContext:
            {{- include "mailscope.containerSecurityContext" $ctx | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
      volumes:
        {{- /* The root filesystem is read-only; /tmp is the one writable place. */}}
        - name: tmp
          emptyDir:
            sizeLimit: 64Mi
      {{- with $v.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- range . }}
        {{- $c := deepCopy . }}
        {{- /* A constraint without a selector spreads this component's own pods. */}}
        {{- if not (hasKey $c "labelSelector") }}
        {{- $_ := set $c "labelSelector" (dict "matchLabels" (include "mailscope.selectorLabels" $ | fromYaml)) }}
        {{- end }}
        - {{- toYaml $c | nindent 10 }}
        {{- end }}
      {{- end }}
{{- end }}
