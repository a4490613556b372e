variable "install_operator" {
  description = "Install the operator chart. One operator serves every broker of a cluster: set false for each broker after the first."
  type        = bool
  default     = true
}

variable "operator_release_name" {
  description = "Helm release name of the operator (its cluster-wide objects are named after it)."
  type        = string
  default     = "cirrus"
}

variable "operator_namespace" {
  description = "Namespace of the operator (created when create_operator_namespace is true)."
  type        = string
  default     = "cirrus-system"
}

variable "create_operator_namespace" {
  description = "Create the operator's namespace."
  type        = bool
  default     = true
}

variable "chart_path" {
  description = "Path of the cirrus-operator chart (the repository's charts/cirrus-operator by default)."
  type        = string
  default     = null
}

variable "operator_image" {
  description = "Operator image repository and tag."
  type = object({
    repository = string
    tag        = string
  })
  default = {
    repository = "ghcr.io/cirrus-mqtt/cirrus-operator"
    tag        = "0.1.0"
  }
}

variable "operator_replicas" {
  description = "Operator replicas (one leads, the others stand by)."
  type        = number
  default     = 2
}

variable "operator_values" {
  description = "Extra Helm values for the operator chart (merged over the module's)."
  type        = any
  default     = {}
}

variable "namespace" {
  description = "Namespace of the broker and its users."
  type        = string
}

variable "create_namespace" {
  description = "Create the broker's namespace."
  type        = bool
  default     = true
}

variable "broker_name" {
  description = "Name of the MqttBroker (also of its Service and Deployment)."
  type        = string
  default     = "mqtt"
}

variable "broker_image" {
  description = "Broker image (repository:tag); empty: the operator's own version, upgraded with the operator."
  type        = string
  default     = ""
}

variable "replicas" {
  description = "Broker pods when autoscaling is off."
  type        = number
  default     = 2
}

variable "autoscaling" {
  description = "HorizontalPodAutoscaler for the brokers; null turns it off."
  type = object({
    min_replicas               = number
    max_replicas               = number
    target_cpu_utilization     = optional(number) # the operator's default: 70 unless connections are the target
    target_connections_per_pod = optional(number)
  })
  default = null

  validation {
    condition     = var.autoscaling == null ? true : var.autoscaling.min_replicas <= var.autoscaling.max_replicas
    error_message = "autoscaling.min_replicas must not exceed max_replicas."
  }
}

variable "redis" {
  description = "Where broker state lives: a URL (or a Secret key holding it), a Redis Cluster, or a managed single Redis for development."
  type = object({
    url             = optional(string)
    url_secret_name = optional(string)
    url_secret_key  = optional(string, "url")
    cluster         = optional(bool, false)
    managed         = optional(bool, false)
  })
  default = { managed = true }

  validation {
    condition     = !(try(var.redis.managed, false) && (try(var.redis.url, null) != null || try(var.redis.url_secret_name, null) != null))
    error_message = "redis.managed excludes redis.url and redis.url_secret_name."
  }
}

variable "listeners" {
  description = "Ports of the MQTT (0: off, for a TLS-only broker), MQTT over TLS (null: off), WebSocket and secure WebSocket (null: off) listeners."
  type = object({
    mqtt      = optional(number, 1883)
    mqtts     = optional(number, 8883)
    websocket = optional(number)
    wss       = optional(number)
  })
  default = {}
}

variable "tls" {
  description = "TLS: certificates from the operator's CA, a kubernetes.io/tls Secret of yours (secret_name), or a cert-manager issuer (issuer_ref: name, kind such as ClusterIssuer, group); extra_sans are more names the certificate covers."
  type = object({
    enabled     = optional(bool, true)
    secret_name = optional(string)
    issuer_ref = optional(object({
      name  = string
      kind  = optional(string)
      group = optional(string)
    }))
    extra_sans = optional(list(string), [])
  })
  default = {}

  validation {
    condition     = var.tls.secret_name == null || var.tls.issuer_ref == null
    error_message = "Give tls.secret_name or tls.issuer_ref, not both."
  }
}

variable "service" {
  description = "The broker Service's type and annotations (for example a cloud load balancer's)."
  type = object({
    type        = optional(string, "ClusterIP")
    annotations = optional(map(string), {})
  })
  default = {}

  validation {
    condition     = contains(["ClusterIP", "NodePort", "LoadBalancer"], var.service.type)
    error_message = "service.type is ClusterIP, NodePort or LoadBalancer."
  }
}

variable "allow_anonymous" {
  description = "Let clients without a user name connect."
  type        = bool
  default     = false
}

variable "anonymous_acl" {
  description = "What clients without a user name may do (with allow_anonymous); empty: nothing."
  type = list(object({
    topic      = string
    access     = optional(string, "all")
    permission = optional(string, "allow")
  }))
  default = []
}

variable "users" {
  description = "MQTT users by resource name: optional username (defaults to the name) and ACL rules. Passwords are generated by the operator into <name>-mqtt-credentials."
  type = map(object({
    username = optional(string)
    acl = optional(list(object({
      topic      = string
      access     = optional(string, "all")
      permission = optional(string, "allow")
    })), [])
  }))
  default = {}
}

variable "resources" {
  description = "The broker container's requests and limits ({requests = {cpu, memory}, limits = {...}}); unset: cpu 100m, memory 128Mi requested."
  type        = any
  default     = null
}

variable "node_selector" {
  description = "Node selector of the broker pods."
  type        = map(string)
  default     = {}
}

variable "tolerations" {
  description = "Tolerations of the broker pods (Kubernetes Toleration objects)."
  type        = any
  default     = []
}

variable "affinity" {
  description = "Affinity of the broker pods (a Kubernetes Affinity object)."
  type        = any
  default     = null
}

variable "pod_template" {
  description = "The MqttBroker's podTemplate: labels, annotations, topologySpreadConstraints, imagePullSecrets, priorityClassName, serviceAccountName, env, volumes, volumeMounts."
  type        = any
  default     = null
}

variable "drain" {
  description = "The MqttBroker's drain ({connectionsPerSecond, timeoutSeconds, serverReference})."
  type        = any
  default     = null
}

variable "rebalance" {
  description = "The MqttBroker's rebalance ({enabled, thresholdPercent, connectionsPerSecond, minConnectionAgeSeconds})."
  type        = any
  default     = null
}

variable "rollout" {
  description = "The MqttBroker's rollout ({maxSurge, maxUnavailable, minReadySeconds, progressDeadlineSeconds})."
  type        = any
  default     = null
}

variable "telemetry" {
  description = "The MqttBroker's telemetry ({otlpEndpoint, samplingRatio})."
  type        = any
  default     = null
}
