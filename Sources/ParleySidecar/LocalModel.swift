import Foundation

/// The model `parley serve --local-model` runs beside itself: by default SmolLM2-135M-Instruct in
/// llama.cpp's server (`model-server.py`, shipped in this module's bundle; its Python packages come
/// from `scripts/setup.sh --model`), or any command that serves OpenAI's Chat Completions.
public struct LocalModel: Sendable, Equatable {
    /// The name the bundled server gives its model (and the price list's entry for it).
    public static let bundledModelName = "smollm2"
    /// Context tokens per slot of the bundled server (SmolLM2 was trained on 8192; each of the
    /// server's slots gets this much, so memory grows with the slots, not with the budget).
    public static let bundledContextPerSlot = 2048
    /// Parley's defaults with a local model: replies generated at once (the server's slots;
    /// Parley queues the rest), and a prompt and a reply that fit one slot together with room to
    /// spare, since Parley's token counts are estimates (a 135M model also answers better briefly).
    public static let defaultParallel = 4
    public static let defaultContextBudget = 1536
    public static let defaultReplyTokens = 256

    /// The command, split into words; `{port}` in any word is the port Parley picked.
    public var command: [String]

    /// The bundled SmolLM2 server, or nil when this build's bundle lacks the script.
    public static func bundled(parallel: Int) -> LocalModel? {
        guard let script = resources?.path(forResource: "model-server", ofType: "py") else { return nil }
        return LocalModel(command: [
            "python3", script, "--port", "{port}", "--parallel", String(parallel),
            "--context", String(parallel * bundledContextPerSlot), "--max-seconds", "0",
        ])
    }

    /// The local voice's server script (#29: Piper and faster-whisper as OpenAI's audio API),
    /// nil when this build's bundle lacks it.
    public static var bundledVoiceServer: String? { resources?.path(forResource: "voice-server", ofType: "py") }

    /// This module's resource bundle, beside the executable; nil for a binary copied without it
    /// (`Bundle.module` would look in the build directory, and stop the process without one).
    static let resources = Bundle(path: Bundle.main.bundleURL.appendingPathComponent("parley_ParleySidecar.resources").path)

    /// A command given as one string: split on whitespace (no shell, so no quoting: a command
    /// that needs it belongs in a script). Nil when it has no words.
    public static func command(_ text: String) -> LocalModel? {
        let words = text.split(whereSeparator: \.isWhitespace).map(String.init)
        return words.isEmpty ? nil : LocalModel(command: words)
    }

    /// The sidecar that runs this model on `port`, logging to `logPath`.
    public func sidecar(port: Int, logPath: String) -> Sidecar.Configuration {
        var configuration = Sidecar.Configuration(
            arguments: command.map { $0.replacing("{port}", with: String(port)) }, port: port, logPath: logPath
        )
        configuration.environment = ["PARLEY_MODEL_PORT": String(port)]
        return configuration
    }

    /// The OpenAI-compatible base URL of the model on `port`.
    public static func baseURL(port: Int) -> String { "http://127.0.0.1:\(port)/v1" }
}
