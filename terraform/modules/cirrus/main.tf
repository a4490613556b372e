locals {
  chart = coalesce(var.chart_path, "${path.module}/../../../charts/cirrus-operator")

  redis = merge(
    var.redis.managed ? { managed = true } : {},
    var.redis.url != null ? { url = var.redis.url } : {},
    var.redis.url_secret_name != null ? {
      urlSecretRef = { name = var.redis.url_secret_name, key = var.redis.url_secret_key }
    } : {},
    var.redis.cluster ? { cluster = true } : {},
  )

  tls = merge(
    { enabled = var.tls.enabled },
    var.tls.secret_name != null ? { secretName = var.tls.secret_name } : {},
    var.tls.issuer_ref != null ? {
      issuerRef = { for k, v in var.tls.issuer_ref : k => v if v != null }
    } : {},
    length(var.tls.extra_sans) > 0 ? { extraSans = var.tls.extra_sans } : {},
  )

  listeners = merge(
    { mqtt = var.listeners.mqtt },
    var.listeners.mqtts != null && var.tls.enabled ? { mqtts = var.listeners.mqtts } : {},
    var.listeners.websocket != null ? { websocket = var.listeners.websocket } : {},
    var.listeners.wss != null && var.tls.enabled ? { wss = var.listeners.wss } : {},
  )

  autoscaling = var.autoscaling == null ? {} : {
    autoscaling = merge(
      {
        minReplicas = var.autoscaling.min_replicas
        maxReplicas = var.autoscaling.max_replicas
      },
      var.autoscaling.target_cpu_utilization != null ? {
        targetCpuUtilization = var.autoscaling.target_cpu_utilization
      } : {},
      var.autoscaling.target_connections_per_pod != null ? {
        targetConnectionsPerPod = var.autoscaling.target_connections_per_pod
      } : {},
    )
  }

  host = "${var.broker_name}.${var.namespace}.svc"

  # Scheduling, resources and the rest: given only when set, so that the
  # CRD's defaults apply otherwise.
  pods = merge(
    var.resources != null ? { resources = var.resources } : {},
    length(var.node_selector) > 0 ? { nodeSelector = var.node_selector } : {},
    length(var.tolerations) > 0 ? { tolerations = var.tolerations } : {},
    var.affinity != null ? { affinity = var.affinity } : {},
    var.pod_template != null ? { podTemplate = var.pod_template } : {},
    var.drain != null ? { drain = var.drain } : {},
    var.rebalance != null ? { rebalance = var.rebalance } : {},
    var.rollout != null ? { rollout = var.rollout } : {},
    var.telemetry != null ? { telemetry = var.telemetry } : {},
  )
}

resource "kubernetes_namespace_v1" "operator" {
  count = var.install_operator && var.create_operator_namespace ? 1 : 0

  metadata {
    name = var.operator_namespace
  }
}

# One operator serves every broker of the cluster: a second instance of
# this module (another broker) sets install_operator = false.
resource "helm_release" "operator" {
  count = var.install_operator ? 1 : 0

  name      = var.operator_release_name
  chart     = local.chart
  namespace = var.operator_namespace

  values = [
    yamlencode({
      image        = { repository = var.operator_image.repository, tag = var.operator_image.tag }
      replicaCount = var.operator_replicas
    }),
    yamlencode(var.operator_values),
  ]

  depends_on = [kubernetes_namespace_v1.operator]
}

resource "kubernetes_namespace_v1" "broker" {
  count = var.create_namespace ? 1 : 0

  metadata {
    name = var.namespace
  }
}

# The CRDs come with the chart: a first `terraform apply` on an empty
# cluster needs `-target=helm_release.operator` before the rest can be
# planned (kubernetes_manifest reads the CRD's schema at plan time).
resource "kubernetes_manifest" "broker" {
  manifest = {
    apiVersion = "mqtt.cirrus.dev/v1alpha1"
    kind       = "MqttBroker"
    metadata = {
      name      = var.broker_name
      namespace = var.namespace
    }
    spec = merge(
      {
        image          = var.broker_image
        replicas       = var.replicas
        redis          = local.redis
        listeners      = local.listeners
        tls            = local.tls
        service        = { type = var.service.type, annotations = var.service.annotations }
        allowAnonymous = var.allow_anonymous
        anonymousAcl = [for r in var.anonymous_acl : {
          topic      = r.topic
          access     = r.access
          permission = r.permission
        }]
      },
      local.autoscaling,
      local.pods,
    )
  }

  wait {
    condition {
      type   = "Ready"
      status = "True"
    }
  }

  timeouts {
    create = "10m"
    update = "10m"
  }

  depends_on = [helm_release.operator, kubernetes_namespace_v1.broker]
}

resource "kubernetes_manifest" "user" {
  for_each = var.users

  manifest = {
    apiVersion = "mqtt.cirrus.dev/v1alpha1"
    kind       = "MqttUser"
    metadata = {
      name      = each.key
      namespace = var.namespace
    }
    spec = merge(
      {
        brokerRef = var.broker_name
        acl = [for r in each.value.acl : {
          topic      = r.topic
          access     = r.access
          permission = r.permission
        }]
      },
      each.value.username != null ? { username = each.value.username } : {},
    )
  }

  wait {
    condition {
      type   = "Ready"
      status = "True"
    }
  }

  depends_on = [kubernetes_manifest.broker]
}
