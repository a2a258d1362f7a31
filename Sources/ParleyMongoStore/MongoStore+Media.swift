import Foundation
import ParleyCore
import ParleyStore

extension MongoStore {
    public func saveClip(_ clip: VoiceClip) async throws {
        try await run { db in
            try db.insert(
                "voice_clips",
                .object([
                    ("_id", .string(clip.id)), ("kind", .string(clip.kind.rawValue)), ("content_type", .string(clip.contentType)),
                    ("owner", .string(clip.owner)), ("stream", .string(clip.stream)),
                    ("conversation", clip.conversation.map(JSONValue.string) ?? .null), ("room", clip.room.map(JSONValue.string) ?? .null),
                    ("message", clip.message.map(JSONValue.string) ?? .null), ("sample_rate", .long(Int64(clip.sampleRate))),
                    ("bytes", .long(Int64(clip.bytes))), ("truncated", .bool(clip.truncated)), ("saved", .bool(clip.saved)),
                    ("created_at", .long(clip.createdAt)), ("audio", .string(Data(clip.audio).base64EncodedString())),
                ]))
        }
    }

    public func clip(id: String, owner: String, withAudio: Bool) async throws -> VoiceClip? {
        try await run { db in
            try db.find(
                "voice_clips", filter: .object([("_id", .string(id)), ("owner", .string(owner))]),
                projection: withAudio ? nil : .object([("audio", .int(0))]), limit: 1
            ).first.map(Self.clip(from:))
        }
    }

    public func clips(owner: String, limit: Int, before: String?) async throws -> [VoiceClip] {
        var filter: [(String, JSONValue)] = [("owner", .string(owner))]
        if let before { filter.append(("_id", .object([("$lt", .string(before))]))) }
        return try await run { [filter] db in
            try db.find(
                "voice_clips", filter: .object(filter), sort: .object([("_id", .int(-1))]), projection: .object([("audio", .int(0))]), limit: limit
            ).map(Self.clip(from:))
        }
    }

    public func setClipSaved(id: String, owner: String, saved: Bool) async throws -> Bool {
        try await run { db in
            try db.update(
                "voice_clips", query: .object([("_id", .string(id)), ("owner", .string(owner))]),
                update: .object([("$set", .object([("saved", .bool(saved))]))])
            ).matched > 0
        }
    }

    /// Looks first, as a clone's deletion does: a retry after a lost reply deletes nothing where
    /// its first attempt deleted the clip, and the count alone would say there was none.
    public func deleteClip(id: String, owner: String) async throws -> Bool {
        try await run { db in
            let query = JSONValue.object([("_id", .string(id)), ("owner", .string(owner))])
            guard try !db.find("voice_clips", filter: query, projection: .object([("_id", .int(1))]), limit: 1).isEmpty else { return false }
            _ = try db.delete("voice_clips", query: query)
            return true
        }
    }

    public func purgeClips(createdBefore cutoff: Int64, limit: Int) async throws -> Int {
        try await run { db in
            let old = try db.find(
                "voice_clips",
                filter: .object([("saved", .bool(false)), ("created_at", .object([("$lt", .long(cutoff))])), ("kind", .string("reply"))]),
                sort: .object([("created_at", .int(1))]), projection: .object([("_id", .int(1))]), limit: limit)
            return try Self.delete(db, "voice_clips", field: "_id", in: old.compactMap { $0["_id"] })
        }
    }

    static func clip(from d: JSONValue) -> VoiceClip {
        VoiceClip(
            id: d["_id"]?.stringValue ?? "", kind: VoiceClip.Kind(rawValue: d["kind"]?.stringValue ?? "") ?? .reply,
            contentType: d["content_type"]?.stringValue ?? "audio/pcm", owner: d["owner"]?.stringValue ?? "", stream: d["stream"]?.stringValue ?? "",
            conversation: d["conversation"]?.stringValue, room: d["room"]?.stringValue, message: d["message"]?.stringValue,
            sampleRate: Int(d["sample_rate"]?.int64 ?? 24_000),
            audio: d["audio"]?.stringValue.flatMap { Data(base64Encoded: $0) }.map(Array.init) ?? [], bytes: Int(d["bytes"]?.int64 ?? 0),
            truncated: d["truncated"]?.boolValue ?? false, saved: d["saved"]?.boolValue ?? false, createdAt: d["created_at"]?.int64 ?? 0)
    }
}
