{{/*
Names, labels and the pieces shared by the api, worker, migration and sandbox pods.
*/}}

{{/* The chart name, overridable. */}}
{{- define "mailscope.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's base name. Truncated to 40 characters so that suffixed names
("-worker-metrics", "-migrate-demo") stay within the 63-character DNS label limit.
*/}}
{{- define "mailscope.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "mailscope.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "mailscope.labels" -}}
helm.sh/chart: {{ include "mailscope.chart" . }}
app.kubernetes.io/name: {{ include "mailscope.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mailscope
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of one component. Call with (dict "ctx" $ "component" "api"). */}}
{{- define "mailscope.componentLabels" -}}
{{ include "mailscope.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Selector labels of one component. Never change these in an upgrade: Deployment selectors are
immutable. Call with (dict "ctx" $ "component" "api").
*/}}
{{- define "mailscope.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mailscope.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The image reference; a digest wins over a tag. */}}
{{- define "mailscope.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The port every mailscope HTTP server listens on inside its pod (API, probes, metrics). */}}
{{- define "mailscope.httpPort" -}}8080{{- end }}
{{/* The port the sandbox listens on inside its pod. */}}
{{- define "mailscope.sandboxPort" -}}8090{{- end }}

{{- define "mailscope.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mailscope.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The migration Job runs before the release's own objects exist on a first install, so when the chart
creates the ServiceAccount the Job gets its own, created as a hook just before it.
*/}}
{{- define "mailscope.migrate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- printf "%s-migrate" (include "mailscope.fullname" .) }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret the api, worker and sandbox read. */}}
{{- define "mailscope.secretName" -}}
{{- if .Values.secrets.existingSecret }}
{{- .Values.secrets.existingSecret }}
{{- else }}
{{- printf "%s-demo" (include "mailscope.fullname" .) }}
{{- end }}
{{- end }}

{{/* The Secret the migration Job reads: in demo mode a hook copy that exists before the Job runs. */}}
{{- define "mailscope.migrate.secretName" -}}
{{- if .Values.secrets.existingSecret }}
{{- .Values.secrets.existingSecret }}
{{- else }}
{{- printf "%s-migrate-demo" (include "mailscope.fullname" .) }}
{{- end }}
{{- end }}

{{/*
Non-secret settings shared by every mailscope process, as environment variables. The ConfigMap
holds them for the Deployments; the migration Job gets the same map inline, because on a first
install its pre-install hook runs before the ConfigMap exists.
*/}}
{{- define "mailscope.configEnv" -}}
MAILSCOPE_LISTEN: {{ printf "0.0.0.0:%s" (include "mailscope.httpPort" .) | quote }}
MAILSCOPE_LOG_FORMAT: {{ .Values.config.logFormat | quote }}
MAILSCOPE_LOG_FILTER: {{ .Values.config.logFilter | quote }}
MAILSCOPE_SHUTDOWN_GRACE_SECONDS: {{ .Values.config.shutdownGraceSeconds | quote }}
{{- with .Values.config.auth.issuer }}
MAILSCOPE_AUTH__ISSUER: {{ . | quote }}
{{- end }}
{{- with .Values.config.auth.audience }}
MAILSCOPE_AUTH__AUDIENCE: {{ . | quote }}
{{- end }}
{{- with .Values.config.auth.jwksUrl }}
MAILSCOPE_AUTH__JWKS_URL: {{ . | quote }}
{{- end }}
{{- range $name, $value := .Values.config.extraEnv }}
{{ $name }}: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/* Environment variables read from the Secret. Call with (dict "ctx" $ "secretName" NAME). */}}
{{- define "mailscope.secretEnv" -}}
{{- $keys := .ctx.Values.secrets.keys -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ $keys.databaseUrl }}
- name: MAILSCOPE_ENCRYPTION_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ $keys.encryptionKey }}
{{- /* Optional: production deployments verify tokens with auth.jwksUrl and leave this key out. */}}
- name: MAILSCOPE_AUTH__HS256_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ $keys.hs256Secret }}
      optional: true
{{- /* Optional: without it, callback URLs are refused (signed callbacks need a shared secret). */}}
- name: MAILSCOPE_WEBHOOKS__SIGNING_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ .secretName }}
      key: {{ $keys.webhookSigningSecret }}
      optional: true
{{- end }}

{{/* The container security context every mailscope container runs with. */}}
{{- define "mailscope.containerSecurityContext" -}}
{{ toYaml .Values.securityContext }}
{{- end }}

{{/*
Checks that need more than the values schema: it cannot see across keys. Included from the
ConfigMap, which every render produces.
*/}}
{{- define "mailscope.validate" -}}
{{- $s := .Values.secrets -}}
{{- if and $s.existingSecret $s.create }}
{{- fail "secrets: set either secrets.existingSecret (production) or secrets.create=true (demo only), not both" }}
{{- end }}
{{- if not (or $s.existingSecret $s.create) }}
{{- fail "secrets.existingSecret is required: name a Secret holding DATABASE_URL and MAILSCOPE_ENCRYPTION_KEY (see docs/deploy.md), or set secrets.create=true for a demo" }}
{{- end }}
{{- if $s.create }}
{{- if not $s.demo.databaseUrl }}
{{- fail "secrets.create=true needs secrets.demo.databaseUrl" }}
{{- end }}
{{- if not $s.demo.encryptionKey }}
{{- fail "secrets.create=true needs secrets.demo.encryptionKey (base64 of 32 random bytes: openssl rand -base64 32)" }}
{{- end }}
{{- end }}
{{- $grace := int .Values.config.shutdownGraceSeconds -}}
{{- range $component := list "api" "worker" }}
{{- $v := index $.Values $component }}
{{- $needed := add $grace (int $v.preStopSleepSeconds) 5 }}
{{- if lt (int $v.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "%s.terminationGracePeriodSeconds (%d) must be at least config.shutdownGraceSeconds + %s.preStopSleepSeconds + 5 (%d), or Kubernetes kills the process before it has released its in-flight work" $component (int $v.terminationGracePeriodSeconds) $component (int $needed)) }}
{{- end }}
{{- if and $v.autoscaling.enabled (gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) }}
{{- fail (printf "%s.autoscaling.minReplicas must not exceed %s.autoscaling.maxReplicas" $component $component) }}
{{- end }}
{{- if $v.pdb.enabled }}
{{- if eq (include "mailscope.isSet" $v.pdb.minAvailable) (include "mailscope.isSet" $v.pdb.maxUnavailable) }}
{{- fail (printf "%s.pdb: set exactly one of minAvailable and maxUnavailable (the other to \"\")" $component) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* The keys of the demo Secret (secrets.create=true). */}}
{{- define "mailscope.demoSecretData" -}}
{{- $k := .Values.secrets.keys -}}
{{- $d := .Values.secrets.demo -}}
{{ $k.databaseUrl }}: {{ $d.databaseUrl | quote }}
{{ $k.encryptionKey }}: {{ $d.encryptionKey | quote }}
{{- with $d.hs256Secret }}
{{ $k.hs256Secret }}: {{ . | quote }}
{{- end }}
{{- with $d.webhookSigningSecret }}
{{ $k.webhookSigningSecret }}: {{ . | quote }}
{{- end }}
{{- end }}

{{/*
Annotations of the objects the migration hook needs before the release's own objects exist.
They are created just before the Job (lower weight) and removed once every hook has succeeded;
after a failure they stay for inspection and are replaced by the next attempt.
*/}}
{{- define "mailscope.migrate.supportHookAnnotations" -}}
helm.sh/hook: pre-install,pre-upgrade
helm.sh/hook-weight: "-10"
helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
{{- end }}

{{/* NetworkPolicy egress rule: DNS. */}}
{{- define "mailscope.networkPolicy.dnsEgress" -}}
# DNS.
- to:
    {{- toYaml .Values.networkPolicy.egress.dns.to | nindent 4 }}
  ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
{{- end }}

{{/* NetworkPolicy egress rules every process that talks to PostgreSQL needs: DNS and the database. */}}
{{- define "mailscope.networkPolicy.baseEgress" -}}
{{- $db := .Values.networkPolicy.egress.database -}}
{{ include "mailscope.networkPolicy.dnsEgress" . }}
# PostgreSQL{{ if not $db.to }}, at any address: narrow it with networkPolicy.egress.database.to{{ end }}.
- ports:
    - port: {{ $db.port }}
      protocol: TCP
  {{- with $db.to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* Peak PostgreSQL connections at maximum scale: pool size x replicas per component, plus the migration Job. */}}
{{- define "mailscope.peakConnections" -}}
{{- $total := 0 -}}
{{- $parts := list -}}
{{- range $component := list "api" "worker" }}
{{- $v := index $.Values $component }}
{{- $n := ternary $v.autoscaling.maxReplicas $v.replicas $v.autoscaling.enabled | int }}
{{- $total = add $total (mul $n $v.databasePoolSize) }}
{{- $parts = append $parts (printf "%s %d x %d" $component $n (int $v.databasePoolSize)) }}
{{- end }}
{{- if .Values.migrations.enabled }}
{{- $total = add $total .Values.migrations.databasePoolSize }}
{{- $parts = append $parts (printf "migrate %d" (int .Values.migrations.databasePoolSize)) }}
{{- end }}
{{- printf "%s = %d" (join " + " $parts) $total }}
{{- end }}

{{/* "true" when a value is set: neither null nor "" (0 counts as set). */}}
{{- define "mailscope.isSet" -}}
{{- if not (or (kindIs "invalid" .) (eq (toString .) "")) }}true{{ end }}
{{- end }}
